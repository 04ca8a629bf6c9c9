"""The sentence-embedding example over HTTP, with a real tokenizer class and a small random BERT."""

import asyncio
import random

import pytest
import torch

from tests.fakes import load_example

transformers = pytest.importorskip("transformers")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

WORDS = "the a cat dog sat on mat runs fast slow big small red blue green house tree".split()


def tiny_model():
    """A WordPiece tokenizer over a small vocabulary and a 2-layer BERT with random weights."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = transformers.BertTokenizerFast(vocab=vocab)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    return tok, transformers.BertModel(cfg).eval()


def sentences(n, seed=0):
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.choice([2, 3, 5, 9, 17, 30])))
        for _ in range(n)
    ]


async def test_concurrent_sentences_of_different_lengths_each_get_their_own_embedding():
    ex = load_example("serve_embeddings")
    tok, enc = tiny_model()
    app = ex.create_app(tok, enc)
    texts = sentences(48)
    embedder = ex.Embedder(enc)
    with torch.inference_mode():
        expected = [embedder(dict(tok(t, return_tensors="pt")))[0] for t in texts]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            responses = await asyncio.gather(
                *(client.post("/embed", json={"text": t}) for t in texts)
            )
            stats = (await client.get("/stats")).json()
            empty = await client.post("/embed", json={"text": ""})
    assert empty.status_code == 422
    for r, e in zip(responses, expected, strict=True):
        assert r.status_code == 200, r.text
        got = torch.tensor(r.json()["embedding"])
        assert torch.nn.functional.cosine_similarity(got, e, dim=0) > 0.9999
    assert stats["completed"] == 48 and stats["mean_batch_size"] > 1
    assert 0 <= stats["padding_waste"] < 1
