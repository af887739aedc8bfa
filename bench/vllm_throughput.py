"""Tokens/s of the vllm backend: through agentsoc vs direct requests to the same server, and vs the
llama.cpp backend on the same problems — 3 LoRA adapters (one per "agent"), all calls in flight.

One vLLM server (the backend starts it from .venv-vllm on the bundled model's transformers copy)
serves 3 random PEFT adapters. The same chat requests (round-0 Arithmetic prompts, each adapter
answering every problem with its own seed) go

1. directly, as plain HTTP to /v1/chat/completions (adapters loaded beforehand): the server's own rate;
2. through agentsoc: the vllm backend behind the run's wrappers (retry layer, concurrency limiter);
3. through the llama.cpp backend with the same adapters converted to GGUF (the embedded default).

Ratios from one run on one machine; absolute rates depend on what else runs.

    .venv/bin/python bench/vllm_throughput.py [--n 16] [--max-tokens 96] [--concurrency 24]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2

from agentsoc.backend import Backend
from agentsoc.types import Message, Sampling
from agentsoc.wrappers import compose
from backends import bundled
from backends.hf import hf_copy
from backends.options import LlamaCppOptions, VllmOptions
from backends.refs import adapter_ref
from backends.vllm import VllmBackend, adapter_name

ROOT = Path(__file__).resolve().parents[1]
Request = tuple[str, list[Message], Sampling]

_MAKE_ADAPTERS = """
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
for i, out in enumerate(sys.argv[2:]):
    torch.manual_seed(i)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.3)
    model.save_pretrained(out)
    base = model.unload()
"""


def requests(n: int, refs: list[str], max_tokens: int) -> list[Request]:
    from agentsoc.tasks import arithmetic

    task = arithmetic.create({"pattern": "a*b+c*d", "low": 0, "high": 10})
    out: list[Request] = []
    for p in task.load(0, n, seed=3).test:
        prompt = task.prompts.round0.replace("{question}", p.question)
        for k, ref in enumerate(refs):
            sampling = Sampling(temperature=1.0, top_p=0.9, max_tokens=max_tokens, seed=1000 * k + len(out))
            out.append((ref, [Message(role="user", content=prompt)], sampling))
    return out


async def direct(root: str, reqs: list[Request], names: dict[str, str], concurrency: int) -> tuple[float, int]:
    sem = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(client: httpx2.AsyncClient, ref: str, messages: list[Message], s: Sampling) -> None:
        nonlocal tokens
        body = {
            "model": names[ref],
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
            "seed": s.seed,
        }
        async with sem:
            r = await client.post(f"{root}/v1/chat/completions", json=body)
        r.raise_for_status()
        tokens += int(r.json()["usage"]["completion_tokens"])

    async with httpx2.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, *r) for r in reqs))
        return time.perf_counter() - start, tokens


async def through(backend: Backend, reqs: list[Request], concurrency: int) -> tuple[float, int]:
    stacked = compose(backend, None, concurrency=concurrency)
    start = time.perf_counter()
    outs = await asyncio.gather(*(stacked.complete(*r) for r in reqs))
    return time.perf_counter() - start, sum(o.usage.completion_tokens for o in outs)


async def main_async(n: int, max_tokens: int, concurrency: int, python: str) -> None:
    gguf = bundled.resolve_model_path()
    hf = hf_copy(gguf)
    tmp = Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    peft_dirs = [tmp / f"agent-{i}" / "peft" for i in range(3)]
    subprocess.run([sys.executable, "-c", _MAKE_ADAPTERS, str(hf), *map(str, peft_dirs)], check=True)
    refs = [adapter_ref(bundled.DEFAULT_MODEL, d) for d in peft_dirs]
    reqs = requests(n, refs, max_tokens)
    print(f"{len(reqs)} chat calls ({n} problems x 3 adapters), max_tokens {max_tokens}, concurrency {concurrency}")

    options = VllmOptions(
        serve=True,
        python=python,
        model=str(hf),
        served_model_name=bundled.DEFAULT_MODEL,
        max_loras=6,
        max_model_len=2048,
        server_env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1"},
    )
    vllm = VllmBackend(options, tmp, base_model=hf)
    try:
        start = time.perf_counter()
        await vllm.complete(bundled.DEFAULT_MODEL, reqs[0][1], Sampling(max_tokens=1, seed=0))
        print(f"vLLM server ready in {time.perf_counter() - start:.0f} s (log: {tmp / 'vllm-server.log'})")
        for ref in refs:  # load the adapters up front: both paths then measure serving only
            await vllm.complete(ref, reqs[0][1], Sampling(max_tokens=1, seed=0))
        names = {ref: adapter_name(str(d)) for ref, d in zip(refs, peft_dirs, strict=True)}
        await direct(vllm.root_url, reqs[:concurrency], names, concurrency)  # warm-up, not measured
        d_s, d_tok = await direct(vllm.root_url, reqs, names, concurrency)
        a_s, a_tok = await through(vllm, reqs, concurrency)
    finally:
        await vllm.aclose()
    print(f"vLLM, direct HTTP      : {d_tok:6d} tokens in {d_s:6.1f} s = {d_tok / d_s:6.1f} tok/s")
    print(
        f"vLLM, through agentsoc : {a_tok:6d} tokens in {a_s:6.1f} s = {a_tok / a_s:6.1f} tok/s"
        f"   ratio to direct {a_tok / a_s / (d_tok / d_s):.2f}"
    )

    from backends.gguf_lora import peft_to_gguf
    from backends.llamacpp import LlamaCppBackend

    ggufs = [peft_to_gguf(d, d.parent / "adapter.gguf", base_gguf=gguf) for d in peft_dirs]
    llama = LlamaCppBackend(gguf, model_name=bundled.DEFAULT_MODEL, options=LlamaCppOptions(n_ctx=2048))
    llama.load()
    by_ref = dict(zip(refs, (adapter_ref(bundled.DEFAULT_MODEL, g) for g in ggufs), strict=True))
    llama_reqs = [(by_ref[ref], m, s) for ref, m, s in reqs]
    try:
        await through(llama, llama_reqs[:concurrency], concurrency)  # warm-up
        l_s, l_tok = await through(llama, llama_reqs, concurrency)
    finally:
        await llama.aclose()
    print(
        f"llama.cpp backend      : {l_tok:6d} tokens in {l_s:6.1f} s = {l_tok / l_s:6.1f} tok/s"
        f"   vLLM through agentsoc / llama.cpp {a_tok / a_s / (l_tok / l_s):.2f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16, help="problems (each answered by 3 adapters)")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=24)
    p.add_argument("--python", default=str(ROOT / ".venv-vllm" / "bin" / "python"), help="vLLM's interpreter")
    args = p.parse_args()
    asyncio.run(main_async(args.n, args.max_tokens, args.concurrency, args.python))


if __name__ == "__main__":
    main()
