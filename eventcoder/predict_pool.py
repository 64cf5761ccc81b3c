"""`eventcoder predict --workers N`: chunks coded by N worker processes, each with its own model.

On a CPU, one single-threaded process per core codes more sentences per second than one process
whose threads share every operator: on two cores up to 15% more in our runs (issue 6 notes), because
nothing waits at the end of each matrix product for the slower thread. Each worker loads the model
once (its own memory: about 0.5 GB for MiniLM with its compiled graph) and codes whole chunks into
their part files; the parent reads the input, hands out chunks and adds up the chunks' reports, so
--resume and the rows-in = rows-out + rejects accounting work exactly as with one process.
"""

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

from eventcoder.batch_predict import ChunkCoder, InputChunk, PredictOptions, PredictReport
from eventcoder.errors import WorkerError
from eventcoder.inference import PredictorSpec
from eventcoder.runtime import keep_freed_memory

_coder: ChunkCoder | None = None  # one per worker process, set by _start_worker


def _start_worker(spec: PredictorSpec, options: PredictOptions) -> None:
    global _coder
    # The parent's tokenizer threads would multiply by the number of workers.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    keep_freed_memory()
    _coder = ChunkCoder(spec.load(), options)


def _code(index: int, chunk: InputChunk, source: Path, parts: Path) -> PredictReport:
    assert _coder is not None, "worker used before _start_worker"
    return _coder.code_to_part(index, chunk, source, parts)


def code_in_workers(
    spec: PredictorSpec,
    options: PredictOptions,
    workers: int,
    chunks: Iterable[tuple[int, InputChunk]],
    source: Path,
    parts: Path,
) -> Iterator[PredictReport]:
    """The reports of coded chunks, in the order they finish; each worker writes its chunks' part
    files into `parts`. At most two chunks per worker are in flight, so memory stays bounded
    however large the input. A worker that dies (killed, out of memory) ends the run with a
    WorkerError; the chunks already written stay for --resume."""
    context = get_context("spawn")  # fork would copy the parent's torch threads and locks
    try:
        with ProcessPoolExecutor(
            workers, mp_context=context, initializer=_start_worker, initargs=(spec, options)
        ) as pool:
            pending: set[Future[PredictReport]] = set()
            for index, chunk in chunks:
                pending.add(pool.submit(_code, index, chunk, source, parts))
                if len(pending) >= 2 * workers:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    yield from (future.result() for future in finished)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (future.result() for future in finished)
    except BrokenProcessPool:
        raise WorkerError(
            f"a predict worker process died while coding {source} (killed or out of memory? each of the "
            f"{workers} workers holds its own model); the finished chunks are kept: rerun with --resume, "
            "perhaps with fewer --workers"
        ) from None
