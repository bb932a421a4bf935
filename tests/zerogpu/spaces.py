"""A stand-in for the `spaces` package on a ZeroGPU Space, for tests: `spaces.GPU(duration=...)` runs a generator
handler as ZeroGPU does. In the calling process it reads the Gradio request from Gradio's context (the visitor's
quota) and the duration, pickles the arguments, and forks a worker that unpickles them, runs the handler and sends
each yielded value back pickled; when the caller stops listening, the worker's handler is closed.

Each call is logged as one JSON line to the file named by ZEROGPU_HARNESS_LOG: whether a request was seen, the
duration asked for, and the pickled arguments' size.
"""
import json
import multiprocessing
import os
import pickle

END = "end"


def GPU(task=None, *, duration=None, size=None):
    if task is None:
        return lambda function: _gpu(function, duration)
    return _gpu(task, duration)


def _gpu(task, duration):
    def handler(*args, **kwargs):
        from gradio.context import LocalContext

        request = LocalContext.request.get(None)
        seconds = duration(*args, **kwargs) if callable(duration) else duration
        payload = pickle.dumps((args, kwargs))  # what cannot cross into the worker fails here, as on ZeroGPU
        _log(request=request is not None, duration=seconds, argument_bytes=len(payload))
        context = multiprocessing.get_context("fork")
        results, stop = context.Queue(), context.Event()
        worker = context.Process(target=_work, args=(task, payload, results, stop), daemon=True)
        worker.start()
        try:
            while (item := results.get()) != END:
                kind, value = pickle.loads(item)
                if kind == "error":
                    raise value
                yield value
        finally:
            stop.set()
            worker.join(timeout=60)

    return handler


def _work(task, payload, results, stop):
    args, kwargs = pickle.loads(payload)
    stream = task(*args, **kwargs)
    try:
        for value in stream:
            results.put(pickle.dumps(("value", value)))
            if stop.is_set():
                break
    except Exception as error:
        results.put(pickle.dumps(("error", error)))
    finally:
        stream.close()
        results.put(END)


def _log(**fields):
    path = os.environ.get("ZEROGPU_HARNESS_LOG")
    if path:
        with open(path, "a") as log:
            log.write(json.dumps(fields) + "\n")
