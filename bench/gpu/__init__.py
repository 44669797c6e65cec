"""Berth's engine against transformers on one GPU, same weights, same workload, one run.

For each model shape (random-initialised weights of the real architecture, saved as a HF model
directory with a byte-level BPE tokenizer that fills the model's whole vocabulary, so a run of
token ids decodes to text that re-encodes to the same ids), it measures:

(a) Berth's engine in-process (``EngineCore`` stepped on this thread): output tokens/s for the
    whole workload, and batch-1 decode tokens/s;
(b) Berth's HTTP server (``berth serve`` in a subprocess) under ``berth bench``: throughput with
    every request sent at once, and TTFT/TPOT/ITL at ``--concurrency`` concurrent streams;
(c) transformers ``generate_batch`` (continuous batching), when the installed version has it;
(d) transformers ``generate`` at batch ``--generate-batch`` and batch-1 with a static cache;

plus a greedy agreement check (engine vs ``generate``, token for token) and a torch.profiler
breakdown of a short engine run (GPU busy time vs wall time, top kernels). Default workload:
256 requests, 128 prompt tokens, 256 output tokens, EOS ignored, greedy.

Results: ``bench/results/gpu-engine-<gpu>.json`` and ``.md`` with the GPU, driver, CUDA, torch and
transformers versions and the ratios (engine / generate_batch; batch-1 engine / static-cache
generate). ``--smoke`` runs the same code on CPU with tiny models and few requests (CI), writing
``gpu-engine-cpu-smoke.*``, which is labelled as such and is not a benchmark.

Modules, one job each: ``models`` (the shapes, random-weight model directories, prompts),
``device`` (the machine, torch sync/free), ``engine_run`` (a), ``server_run`` (b),
``hf_baselines`` (c, d and the greedy reference), ``report`` (ratios, JSON and Markdown),
``cli`` (arguments and the run); ``bench/gpu_engine.py`` is the entry point.

    make bench-gpu                      # python bench/gpu_engine.py
    python bench/gpu_engine.py --models qwen2.5-0.5b --num-requests 64
    python bench/gpu_engine.py --smoke  # CPU, a minute
"""
