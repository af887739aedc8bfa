"""The Tinker API (Thinking Machines; Baseten's Loops serves the same API): hosted LoRA finetuning and
sampling of open models, billed per token, through the ``tinker`` SDK (imported lazily).

Model refs: a base model is its provider name (``Qwen/Qwen3-8B``); a finetuned agent is
``<base>+sampler:<tinker://…/sampler_weights/…>+state:<tinker://…/weights/…>`` — what sampling needs
(the sampler weights, no deployment) and what continued finetuning needs (the saved training state).

Chat renders with the base model's own chat template (:mod:`backends.tinker_text`, local tokenizer
files only) and stops at the template's end-of-turn token. Fine-tuning is a loop this process drives
(:mod:`backends.tinker_train`): ``submit_finetune`` writes the job's input to the run directory and
starts an asyncio task; ``poll_finetune`` reads its progress file — and restarts the task from its
last saved state when the process that ran it died (a resumed run polls, it does not resubmit).

Retries: the SDK retries by itself at the HTTP level (up to 10 times on 408/409/429/5xx and dropped
connections) and cannot be told not to in 0.38; its sampling-level retry loop *can* be switched
off and is (``RetryConfig(enable_retry_logic=False)``). What surfaces past the SDK is mapped once:
a 4xx or a user-category failure is fatal, the rest transient, for the one retry layer
(:class:`agentsoc.wrappers.Retrying`) or the job runner (a failed job is resumed from its state).

The key comes only from ``TINKER_API_KEY``; it is handed to the SDK and never written anywhere, and
every message this module raises is scrubbed of it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agentsoc.backend import (
    Capabilities,
    FatalBackendError,
    ModelNotFoundError,
    TransientBackendError,
)
from agentsoc.types import (
    ChatExample,
    Completion,
    FinetuneSpec,
    Job,
    JobState,
    Message,
    ModelRef,
    Sampling,
    TokenLogprobs,
    Usage,
)
from backends.job_folder import key_slug
from backends.options import TinkerOptions
from backends.tinker_text import ChatCodec, load_tokenizer
from backends.tinker_train import Adam, JobFiles, Progress, train

log = logging.getLogger(__name__)

KEY_ENV = "TINKER_API_KEY"
_SAMPLER = "+sampler:"
_STATE = "+state:"
_ATTEMPT = re.compile(r"#attempt-\d+$")


def finetuned_ref(base: str, sampler_path: str, state_path: str) -> ModelRef:
    return f"{base}{_SAMPLER}{sampler_path}{_STATE}{state_path}"


def parse_ref(ref: ModelRef) -> tuple[str, str | None, str | None]:
    """(base model, sampler path, training-state path) of a ref."""
    if _SAMPLER not in ref:
        return ref, None, None
    base, rest = ref.split(_SAMPLER, 1)
    sampler, _, state = rest.partition(_STATE)
    return base, sampler, state or None


class TinkerBackend:
    name = "tinker"

    def __init__(self, options: TinkerOptions, run_dir: Path, *, key: str | None) -> None:
        self.options = options
        self.capabilities = Capabilities(
            finetune=True, score=True, max_active_jobs=options.max_active_jobs, adapters=False
        )
        self.state_dir = run_dir / options.state_dir
        self._key = key
        self._service: Any = None
        self._codecs: dict[str, ChatCodec] = {}
        self._samplers: dict[str, asyncio.Future[Any]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.base_url = options.base_url or os.environ.get("TINKER_BASE_URL") or "the Tinker API"

    # ------------------------------------------------------------------ plumbing

    def scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _sdk(self) -> Any:
        import tinker  # lazily: only this backend needs it

        return tinker

    async def _client(self) -> Any:
        if self._service is None:
            if not self._key:
                raise FatalBackendError(f"tinker backend: {KEY_ENV} is not set (the key is read from it only)")
            tinker = self._sdk()
            try:
                self._service = await asyncio.to_thread(
                    tinker.ServiceClient, base_url=self.options.base_url, api_key=self._key
                )
            except Exception as e:
                raise self._error(e, "connecting") from None
        return self._service

    def codec(self, base: str) -> ChatCodec:
        if base not in self._codecs:
            source = self.options.tokenizer or base
            self._codecs[base] = ChatCodec(
                load_tokenizer(source),
                template_kwargs=dict(self.options.chat_template_kwargs),
                stop_tokens=tuple(self.options.stop_tokens),
            )
        return self._codecs[base]

    def _error(self, e: BaseException, what: str) -> Exception:
        """The SDK's exception as one of the core's, in one scrubbed line."""
        tinker = self._sdk()
        where = f"tinker ({self.base_url}), {what}"
        text = self.scrub(str(e).splitlines()[0] if str(e) else type(e).__name__)
        if isinstance(e, tinker.AuthenticationError | tinker.PermissionDeniedError):
            return FatalBackendError(f"{where}: the key in {KEY_ENV} was refused ({text}); check the key and base_url")
        if isinstance(e, tinker.NotFoundError):
            return ModelNotFoundError(f"{where}: not found ({text})")
        if isinstance(e, tinker.RequestFailedError):
            if str(getattr(e.category, "value", e.category)).lower() == "user":
                return FatalBackendError(f"{where}: refused by the service ({text})")
            return TransientBackendError(f"{where}: the service failed the request ({text})")
        if isinstance(e, tinker.RateLimitError):
            return TransientBackendError(f"{where}: rate limited ({text})")
        if isinstance(e, tinker.APIStatusError):
            if e.status_code >= 500 or e.status_code in (408, 409):
                return TransientBackendError(f"{where}: server error {e.status_code} ({text})")
            return FatalBackendError(f"{where}: HTTP {e.status_code} ({text})")
        if isinstance(e, tinker.APIConnectionError | TimeoutError | ConnectionError):
            return TransientBackendError(f"{where}: connection failed ({text})")
        if isinstance(e, FatalBackendError | TransientBackendError):
            return e
        if isinstance(e, tinker.TinkerError) and "api_key" in text:  # refused by the SDK, never sent
            return FatalBackendError(f"{where}: the key in {KEY_ENV} is not one this SDK accepts ({text})")
        return FatalBackendError(f"{where}: {type(e).__name__}: {text}")

    # ------------------------------------------------------------------ start-up check

    async def check(self, models: Sequence[ModelRef]) -> None:
        """Key, base models and tokenizers, before any paid call: one line for what is wrong."""
        await self._client()  # no key, or one the SDK refuses outright: a line before any request
        tinker = self._sdk()
        try:
            rest = await asyncio.to_thread(tinker.RestClient, base_url=self.options.base_url, api_key=self._key)
            caps = await rest.get_server_capabilities()
        except Exception as e:
            err = self._error(e, "listing the served models")
            if isinstance(err, TransientBackendError):
                return  # busy, not wrong: the calls' retries handle it
            raise err from None
        served = {m.model_name: m for m in caps.supported_models if m.model_name}
        for base in dict.fromkeys(parse_ref(m)[0] for m in models):
            model = served.get(base)
            if model is None:
                raise FatalBackendError(
                    f"tinker ({self.base_url}): unknown base model {base!r}; served: {', '.join(sorted(served))}"
                )
            if model.trainable is False or model.sampleable is False:
                cannot = " and ".join(
                    w for w, ok in (("finetune", model.trainable), ("sample", model.sampleable)) if ok is False
                )
                raise FatalBackendError(
                    f"tinker ({self.base_url}): the provider does not serve {base!r} to {cannot}; pick a model "
                    "it lists as trainable and sampleable"
                )
            self.codec(base)  # a missing tokenizer is a start-up line too

    # ------------------------------------------------------------------ chat

    async def _sampler(self, model: ModelRef) -> Any:
        base, sampler_path, _ = parse_ref(model)
        fut = self._samplers.get(model)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._samplers[model] = fut
            try:
                service = await self._client()
                from tinker.lib.retry_handler import RetryConfig  # not re-exported by the package

                # the SDK's sample-level retry loop off: the run's Retrying wrapper is the one layer;
                # no connection cap of its own either: the Limited wrapper bounds concurrency
                retry = RetryConfig(enable_retry_logic=False, max_connections=None)
                kwargs = {"model_path": sampler_path} if sampler_path else {"base_model": base}
                fut.set_result(await service.create_sampling_client(retry_config=retry, **kwargs))
            except Exception as e:
                del self._samplers[model]
                err = self._error(e, f"opening a sampler for {model}")
                fut.set_exception(err)
                fut.exception()  # retrieved: a later caller creates its own
                raise err from None
        return await asyncio.shield(fut)

    async def complete(self, model: ModelRef, messages: Sequence[Message], sampling: Sampling) -> Completion:
        types = self._sdk().types
        codec = self.codec(parse_ref(model)[0])
        prompt = codec.prompt(messages)
        sampler = await self._sampler(model)
        params = types.SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop=list(codec.stop_tokens),
        )
        try:
            out = await sampler.sample(types.ModelInput.from_ints(prompt), 1, params)
        except Exception as e:
            raise self._error(e, f"sampling {model}") from None
        seq = out.sequences[0]
        tokens = list(seq.tokens)
        return Completion(
            text=codec.decode(tokens),
            usage=Usage(prompt_tokens=len(prompt), completion_tokens=len(tokens)),
            model=model,
            finish_reason=str(getattr(seq.stop_reason, "value", seq.stop_reason)),
        )

    async def score(self, model: ModelRef, messages: Sequence[Message], response: str) -> TokenLogprobs:
        """Teacher-forced log-probabilities of ``response`` (``compute_logprobs``; no top-k, so the KL
        metric has nothing to compare and says so)."""
        types = self._sdk().types
        codec = self.codec(parse_ref(model)[0])
        prompt = codec.prompt(messages)
        answer = codec.tokenizer(response, add_special_tokens=False)["input_ids"]
        if not answer:
            return TokenLogprobs(tokens=(), logprobs=())
        sampler = await self._sampler(model)
        try:
            lps = await sampler.compute_logprobs(
                types.ModelInput.from_ints([*prompt, *answer]), prompt_logprobs_last_n=len(answer)
            )
        except Exception as e:
            raise self._error(e, f"scoring with {model}") from None
        tail = list(lps)[-len(answer) :]
        return TokenLogprobs(
            tokens=tuple(codec.tokenizer.convert_ids_to_tokens(answer)),
            logprobs=tuple(float(x) if x is not None else 0.0 for x in tail),
        )

    # ------------------------------------------------------------------ fine-tuning

    def _files(self, key: str) -> JobFiles:
        return JobFiles(self.state_dir / "jobs" / key_slug(key))

    async def submit_finetune(
        self, base: ModelRef, examples: Sequence[ChatExample], spec: FinetuneSpec, *, key: str
    ) -> Job:
        files = self._files(key)
        if not files.input.exists():  # adopt-before-create: the key's job may exist already
            if spec.method != "lora":
                raise FatalBackendError(
                    f"tinker backend: finetune.spec.method = {spec.method!r} for {key}; a Tinker service trains "
                    'LoRA adapters only: set method = "lora"'
                )
            self.codec(parse_ref(base)[0])  # a missing tokenizer fails here, before anything is paid
            files.write_input(key, base, examples, spec)  # progress.json follows when the task starts
        self._start(files)
        return self._job(files)

    def _inherited(self, key: str) -> Progress:
        """A new attempt of a failed job starts from the furthest state an earlier attempt saved."""
        root = _ATTEMPT.sub("", key)
        best = Progress()
        for n in range(1, 100):
            earlier = self._files(root if n == 1 else f"{root}#attempt-{n}")
            if earlier.input.exists() and (p := earlier.read()) is not None and p.state_path and p.step > best.step:
                best = Progress(step=p.step, state_path=p.state_path, losses=list(p.losses), resumed_from=p.state_path)
        return best

    async def poll_finetune(self, job: Job) -> Job:
        files = self._files(job.key)
        if not files.input.exists():
            raise FatalBackendError(f"tinker backend: no job {job.id} for {job.key} under {files.folder}")
        self._start(files)  # a job this process did not start (a resumed run): continue it
        return self._job(files)

    def _start(self, files: JobFiles) -> None:
        progress = files.read()
        if progress is not None and JobState(progress.state).terminal:
            return
        task = self._tasks.get(str(files.folder))
        if task is None or task.done():
            self._tasks[str(files.folder)] = asyncio.get_running_loop().create_task(self._run(files))

    async def _run(self, files: JobFiles) -> None:
        key, base_ref, examples, spec = files.read_input()
        progress = files.read() or self._inherited(key)
        try:
            base, _, base_state = parse_ref(base_ref)
            encoded = self.codec(base).encode(examples, spec.max_seq_len)
            progress.examples = len(examples)
            progress.truncated = encoded.truncated
            progress.dropped = encoded.dropped_too_long + encoded.dropped_no_target
            why = encoded.nothing_to_train(len(examples), spec.max_seq_len)
            if why is not None:
                progress.state, progress.error, progress.retryable = JobState.FAILED.value, why, False
                files.write(progress)
                return
            service = await self._client()

            async def open_client(p: Progress) -> Any:
                tag = {"agentsoc_job": key_slug(key)}  # the provider's run list names the job
                if p.state_path:  # resumed: weights and Adam moments as saved
                    log.info("tinker job %s: resuming at step %d from %s", key, p.step, p.state_path)
                    return await service.create_training_client_from_state_with_optimizer(
                        p.state_path, user_metadata=tag
                    )
                if base_state:  # continued finetuning: last iteration's weights, a fresh optimizer
                    return await service.create_training_client_from_state(base_state, user_metadata=tag)
                return await service.create_lora_training_client(
                    base_model=base, rank=spec.lora_r, seed=spec.seed, user_metadata=tag
                )

            o = self.options
            await train(
                files,
                progress,
                encoded.rows,
                spec,
                open_client=open_client,
                adam=Adam(o.adam_beta1, o.adam_beta2, o.adam_eps, o.grad_clip_norm),
                save_every=o.save_every,
                name=key_slug(key),
                types=self._sdk().types,
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:
            err = self._error(e, f"training {files.folder.name}")
            progress.state, progress.error = JobState.FAILED.value, str(err)
            progress.retryable = isinstance(err, TransientBackendError)
            files.write(progress)

    def _job(self, files: JobFiles) -> Job:
        key, base_ref, _, _ = files.read_input()
        p = files.read() or Progress()
        state = JobState(p.state)
        result = None
        if state is JobState.SUCCEEDED and p.sampler_path and p.state_path:
            result = finetuned_ref(parse_ref(base_ref)[0], p.sampler_path, p.state_path)
        return Job(
            key=key,
            backend=self.name,
            id=files.folder.name,
            base=base_ref,
            state=state,
            result=result,
            error=p.error,
            progress=(p.step / p.total) if p.total else None,
            trained_tokens=p.trained_tokens or None,
            examples=p.examples,
            truncated=p.truncated,
            dropped=p.dropped,
            losses=tuple(p.losses),
            retryable=p.retryable,
        )

    async def release(self, models: Sequence[ModelRef]) -> None:
        for model in models:
            self._samplers.pop(model, None)

    async def aclose(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()
        if self._service is not None:
            service, self._service = self._service, None
            try:
                await asyncio.wait_for(service.close("success"), 30)
            except Exception as e:
                log.debug("tinker: closing the session: %s", self.scrub(str(e)))


def create(options: TinkerOptions, run_dir: Path) -> TinkerBackend:
    """The backend from its recipe options; the key is read from ``TINKER_API_KEY`` only."""
    return TinkerBackend(options, run_dir, key=os.environ.get(KEY_ENV) or None)
