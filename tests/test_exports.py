import asyncnn

PUBLIC = {
    "AsyncLoader",
    "AsyncnnError",
    "Batching",
    "Graph",
    "GraphError",
    "LoaderError",
    "LoaderStats",
    "Node",
    "Overloaded",
    "Pipeline",
    "PipelineClosed",
    "PipelineFull",
    "PipelineStats",
    "Stage",
    "StageError",
    "StageStats",
    "StepModel",
    "StepStats",
    "Stepping",
    "WorkerLost",
    "__version__",
    "latency_gc",
}


def test_all_lists_exactly_the_public_names():
    assert set(asyncnn.__all__) == PUBLIC
    for name in asyncnn.__all__:
        assert hasattr(asyncnn, name), name


def test_contract_imports():
    from asyncnn import (  # noqa: F401
        AsyncnnError,
        Graph,
        Pipeline,
        PipelineClosed,
        PipelineFull,
        Stage,
        StageError,
    )


def test_exception_tree():
    for exc in (
        asyncnn.GraphError,
        asyncnn.StageError,
        asyncnn.PipelineClosed,
        asyncnn.PipelineFull,
        asyncnn.LoaderError,
    ):
        assert issubclass(exc, asyncnn.AsyncnnError)
    assert issubclass(asyncnn.GraphError, ValueError)
    assert issubclass(asyncnn.Overloaded, asyncnn.PipelineFull)
