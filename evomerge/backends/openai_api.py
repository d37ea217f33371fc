"""Any OpenAI-compatible endpoint (vLLM, llama.cpp, transformers serve, a provider) as a backend.

- loss / multiple_choice: `completions` with `echo=True` + `logprobs`, the prompt's own token
  logprobs scored on the continuation's characters (`text_offset`); servers that ignore echo or
  logprobs are caught by `check()` before any work.
- generate_until: `completions` (or `chat.completions` when a task asks for the chat template),
  greedy (temperature 0), stop strings sent (at most 4) and applied again on our side.
- Async with bounded concurrency; the openai client retries 429, 5xx, timeouts and connection
  errors with exponential backoff (`max_retries`).
- The API key is read from the environment variable named by `api_key_env` (default
  OPENAI_API_KEY); it is never logged or written anywhere.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Optional
from urllib.parse import urlparse

from evomerge.backends import Backend
from evomerge.errors import EvomergeError, did_you_mean, redact


def normalize_base_url(url: str) -> str:
    """http://host:8000 -> http://host:8000/v1 (the API root the openai client expects)."""
    url = url.rstrip("/")
    if urlparse(url).path in ("", "/"):
        url += "/v1"
    return url


def parse_echo_logprobs(choice: Any, prompt: str, context_chars: int) -> tuple[float, int, bool]:
    """(sum logprob, n tokens, greedy) of the tokens of `prompt[context_chars:]`.

    `choice` is a completions choice from a request with echo=True and logprobs >= 1: its
    `logprobs` holds tokens, token_logprobs, top_logprobs and text_offset over prompt + output.
    """
    logprobs = getattr(choice, "logprobs", None)
    offsets = getattr(logprobs, "text_offset", None) if logprobs is not None else None
    token_logprobs = getattr(logprobs, "token_logprobs", None) if logprobs is not None else None
    if not offsets or not token_logprobs:
        raise EvomergeError(
            "the endpoint returned no prompt logprobs (it ignores echo=True + logprobs); loss and"
            " multiple_choice tasks need a server that supports them (vLLM, llama.cpp server);"
            " generate_until tasks work without"
        )
    start = prompt_start(logprobs.tokens or [], offsets, prompt)
    context_chars, prompt_chars = start + context_chars, start + len(prompt)
    tokens = logprobs.tokens or []
    tops = logprobs.top_logprobs or [None] * len(tokens)
    total, count, greedy = 0.0, 0, True
    for i, offset in enumerate(offsets):
        if offset < context_chars or offset >= prompt_chars:
            continue
        value = token_logprobs[i]
        if value is None:
            continue
        total += float(value)
        count += 1
        top = tops[i] if i < len(tops) else None
        if top:
            best = max(top.values())
            greedy = greedy and float(value) >= best - 1e-6
    if count == 0:
        raise EvomergeError("the endpoint's echoed tokens do not cover the continuation (text_offset)")
    return total, count, greedy


def prompt_start(tokens: list[str], offsets: list[int], prompt: str) -> int:
    """Where the prompt begins in the text the offsets count: vLLM counts the tokens it adds
    before the prompt (a BOS `<s>`: the prompt's first character is at offset 3), others do not."""
    joined = "".join(tokens)
    for offset in offsets:
        if joined.startswith(prompt, offset):
            return offset
    return 0  # tokens that do not spell the prompt (a byte-level vocabulary): trust the offsets


class OpenAIBackend(Backend):
    name = "openai"
    # It scores the model an endpoint serves: nothing can put a candidate's merged weights into it,
    # so a search refuses it up front (evomerge.worker.check_backend); `evomerge eval` scores it.
    weights = "none"
    loglikelihoods = True  # if the server echoes prompt logprobs: `check` asks it before any work
    chat_template = False  # it holds no tokenizer; a chat task goes through chat.completions

    def __init__(
        self,
        base_url: str,
        model: Optional[str] = None,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        max_retries: int = 5,
        timeout: float = 120.0,
        echo_max_tokens: int = 1,
        top_logprobs: int = 1,
        seed: Optional[int] = None,
        preflight: bool = True,
        batch_size: Any = None,  # accepted for a uniform CLI; requests go one prompt each
    ):
        self.base_url = normalize_base_url(base_url)
        self.api_key_env = api_key_env
        self.concurrency = int(concurrency)
        self.max_retries = int(max_retries)
        self.timeout = float(timeout)
        self.echo_max_tokens = int(echo_max_tokens)  # 1 (lm-eval's choice); some servers take 0
        self.top_logprobs = int(top_logprobs)
        self.seed = seed
        self.model = model
        self._echo_checked = False
        self.loglikelihood_concurrency = self.concurrency  # see preflight: 1 against a LoRA server
        if preflight:
            self.model = self.preflight()

    def _api_key(self) -> str:
        return os.environ.get(self.api_key_env) or "EMPTY"  # local servers accept any key

    def _error(self, error: Exception) -> EvomergeError:
        import openai

        if isinstance(error, EvomergeError):
            return error
        if isinstance(error, (openai.AuthenticationError, openai.PermissionDeniedError)):
            state = "is set" if os.environ.get(self.api_key_env) else "is not set"
            return EvomergeError(
                f"endpoint {self.base_url} refused the API key ({error.status_code}): check the"
                f" environment variable {self.api_key_env} (it {state}) or pick another with --api-key-env"
            )
        if isinstance(error, openai.APITimeoutError):
            return EvomergeError(f"endpoint {self.base_url} timed out after {self.max_retries} retries")
        if isinstance(error, openai.APIConnectionError):
            cause = error.__cause__ or error
            return EvomergeError(f"cannot reach endpoint {self.base_url} ({type(cause).__name__}); is the server up?")
        if isinstance(error, openai.APIStatusError):
            message = redact(str(getattr(error, "message", error)), (self._api_key(),)).splitlines()[0][:200]
            return EvomergeError(f"endpoint {self.base_url} answered {error.status_code}: {message}")
        return EvomergeError(f"endpoint {self.base_url}: {type(error).__name__}: {redact(str(error), (self._api_key(),))}")

    def preflight(self) -> str:
        """List the endpoint's models: one-line errors for unreachable / auth; returns the model."""
        import openai

        client = openai.OpenAI(
            base_url=self.base_url, api_key=self._api_key(), max_retries=1, timeout=min(self.timeout, 15.0)
        )
        try:
            models = list(client.models.list())
        except openai.NotFoundError:
            models = []  # no /models route: trust the given name
        except Exception as error:  # noqa: BLE001 - turned into one line
            raise self._error(error) from None
        finally:
            client.close()
        ids = [m.id for m in models]
        if any((m.model_extra or {}).get("parent") for m in models):
            # a vLLM server with --enable-lora (its adapters list their base as `parent`): vLLM 0.32
            # computes prompt logprobs with one LoRA index per request, not per token, and a batch
            # of several echo requests kills its engine (vllm-project/vllm#16668). One at a time,
            # the index broadcasts over the prompt's tokens and the numbers are right.
            self.loglikelihood_concurrency = 1
        if self.model is None:
            if not ids:
                raise EvomergeError(f"endpoint {self.base_url} lists no models; name one with --model")
            return ids[0]
        if ids and self.model not in ids:
            raise EvomergeError(f"endpoint {self.base_url} does not serve model {self.model!r};"
                                f"{did_you_mean(self.model, ids)} available: {', '.join(ids[:10])}")
        return self.model

    def check(self, output_types: set[str]) -> None:
        """Before any work: loss / multiple_choice tasks need echo + logprobs from the server."""
        if output_types & {"loss", "multiple_choice"} and not self._echo_checked:
            self.loglikelihood([("Hello", " world")])
            self._echo_checked = True

    # -- async plumbing -----------------------------------------------------------------------

    def _run(self, make_calls, concurrency: Optional[int] = None):
        import openai

        async def main():
            client = openai.AsyncOpenAI(
                base_url=self.base_url, api_key=self._api_key(), max_retries=self.max_retries, timeout=self.timeout
            )
            semaphore = asyncio.Semaphore(concurrency or self.concurrency)

            async def bounded(call):
                async with semaphore:
                    return await call(client)

            try:
                return await asyncio.gather(*(bounded(call) for call in make_calls))
            finally:
                await client.close()

        try:
            return asyncio.run(main())
        except Exception as error:  # noqa: BLE001 - turned into one line
            raise self._error(error) from None

    def _common(self) -> dict:
        return {"temperature": 0.0, **({"seed": self.seed} if self.seed is not None else {})}

    # -- the backend interface ----------------------------------------------------------------

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, int, bool]]:
        def call(context: str, continuation: str):
            stripped = context.rstrip()  # trailing spaces belong to the continuation (as in hf)
            prompt = context + continuation

            async def run(client):
                response = await client.completions.create(
                    model=self.model,
                    prompt=prompt,
                    echo=True,
                    logprobs=self.top_logprobs,
                    max_tokens=self.echo_max_tokens,
                    **self._common(),
                )
                return parse_echo_logprobs(response.choices[0], prompt, len(stripped))

            return run

        return list(self._run([call(c, x) for c, x in requests], self.loglikelihood_concurrency))

    def generate_until(self, requests: list[tuple[str, dict]]) -> list[str]:
        from evomerge.evaluator import cut_at_stop

        def call(context: str, kwargs: dict):
            until = [s for s in kwargs.get("until") or [] if s]
            options = {
                "model": self.model,
                "max_tokens": int(kwargs.get("max_gen_toks") or 64),
                **({"stop": until[:4]} if until else {}),
                **self._common(),
            }

            async def run(client):
                if kwargs.get("chat"):
                    response = await client.chat.completions.create(
                        messages=[{"role": "user", "content": context}], **options
                    )
                    text = response.choices[0].message.content or ""
                else:
                    response = await client.completions.create(prompt=context, **options)
                    text = response.choices[0].text or ""
                return cut_at_stop(text, until)

            return run

        return list(self._run([call(c, k) for c, k in requests]))
