"""Figure 8 on a stored run: KL between each finetuned agent (generator and critic) and the base model.

Reads the run's held-out transcripts per evaluated iteration and scores each agent's responses under
its own model and under the base model through the run's backend (a backend that can score:
local, llamacpp, mock; the openai and vllm backends cannot yet). See :mod:`agentsoc.drift` for the measure and
how it differs from the paper's (which scored with a separate Gemma-2 2B model).

    .venv/bin/python bench/kl_from_base.py runs/arithmetic-local [--problems 20]
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from agentsoc.config import load_recipe
from agentsoc.drift import kl_from_base
from agentsoc.society import Society


async def run(run_dir: Path, problems: int) -> None:
    recipe = load_recipe(run_dir / "recipe.toml")
    async with Society.from_recipe(recipe, run_dir=run_dir, resume=True, progress=False) as soc:
        if not soc.backend.capabilities.score:
            raise SystemExit(f"backend {recipe.backend.name!r} cannot score responses: no KL from the base model")
        base = recipe.society.base_models()
        phases = sorted((p for p in soc.store.phases() if p.endswith("/eval")), key=lambda p: int(p[5:].split("/")[0]))
        print("iteration  agent  role       KL(agent || base)  responses  model")
        for phase in phases:
            transcripts = list(soc.store.transcripts(phase).values())[:problems]
            for d in await kl_from_base(soc.backend, transcripts, base):
                kl = "–" if d.kl is None else f"{d.kl:.4f}"
                print(f"{phase.split('/')[0]:9s}  {d.agent:5d}  {d.role:9s}  {kl:>17s}  {d.responses:9d}  {d.model}")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--problems", type=int, default=20, help="held-out problems scored per iteration")
    args = ap.parse_args()
    asyncio.run(run(args.run_dir, args.problems))


if __name__ == "__main__":
    main()
