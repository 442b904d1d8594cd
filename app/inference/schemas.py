"""Request and response bodies: OpenAI shapes for chat/completions, plus `/v1/predictions`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_PREDICTION_INPUTS = 1024
MAX_N = 16
MAX_STOP = 4


class _Lenient(BaseModel):
    # Unknown OpenAI fields (user, logit_bias, presence_penalty...) are accepted and ignored.
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"] = Field("text", description="Always `text`.")
    text: str = Field(description="The text.")


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(description="Who wrote the message.")
    content: str | list[TextPart] | None = Field(None, description="The message text, or a list of text parts.")
    name: str | None = Field(None, description="Optional participant name (ignored).")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Lenient):
    include_usage: bool = Field(False, description="Send a last chunk with the usage of the whole request.")


class SamplingParams(_Lenient):
    model: str = Field(description="A fine-tuned model (`ft:...`) or checkpoint (`ftckpt-...`) of the project.")
    max_tokens: int | None = Field(
        None, ge=1, description="Most tokens to generate per choice (capped by the server's inference_max_new_tokens).")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Same as max_tokens (the newer OpenAI name); wins when both are set.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Sampling temperature, 0 to 2; 0 is greedy.")
    top_p: float = Field(
        1.0, gt=0.0, le=1.0,
        description="Nucleus sampling: keep the smallest set of tokens with this much probability.")
    n: int = Field(1, ge=1, le=MAX_N, description="Choices to generate.")
    stop: str | list[str] | None = Field(
        None, description="Up to 4 sequences that end generation (not included in the output).")
    seed: int | None = Field(None, description="Seed for reproducible sampling.")
    stream: bool = Field(
        False, description="Stream the answer as server-sent events (`data: {...}` chunks, then `data: [DONE]`).")
    stream_options: StreamOptions | None = Field(None, description="Streaming options.")

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s][:MAX_STOP]

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ChatCompletionRequest(SamplingParams):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{
        "model": "ft:smollm2-135m:default::ftjob-abc123", "temperature": 0, "max_tokens": 64,
        "messages": [{"role": "user", "content": "What is the capital of Sweden?"}],
    }]})
    messages: list[ChatMessage] = Field(
        min_length=1, description="The conversation so far; the model answers as the assistant.")


class CompletionRequest(SamplingParams):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{
        "model": "ft:tiny-lm:default::ftjob-abc123", "prompt": "The capital of France is", "max_tokens": 8,
    }]})
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A prompt, a list of prompts, or token ids (one list, or a list of lists).")
    max_tokens: int | None = Field(
        16, ge=1, description="Most tokens to generate per choice (16 by default, as OpenAI's legacy completions).")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class PredictionRequest(_Lenient):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{
        "model": "ft:minilm-l6:default::ftjob-abc123", "input": ["Great phone.", "Awful coffee."],
    }]})
    model: str = Field(description="A fine-tuned classification, regression or masked-LM model of the project.")
    input: str | list[str] = Field(description="One text or a batch; '[MASK]' marks masked_lm blanks")
    top_k: int = Field(5, ge=1, le=100, description="masked_lm: fills returned per mask token")

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens of the input.")
    completion_tokens: int = Field(0, description="Tokens generated.")
    total_tokens: int = Field(description="prompt_tokens + completion_tokens.")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = Field("assistant", description="Always `assistant`.")
    content: str = Field(description="The generated text.")
    refusal: None = Field(None, description="Always null.")


class ChatChoice(BaseModel):
    index: int = Field(description="Position among the `n` choices.")
    message: AssistantMessage = Field(description="The generated message.")
    logprobs: None = Field(None, description="Always null (not supported).")
    finish_reason: str = Field(description="`stop` (a stop sequence or end of text) or `length`.")


class ChatCompletion(BaseModel):
    id: str = Field(description="The completion id (`chatcmpl-...`).")
    object: Literal["chat.completion"] = Field("chat.completion", description="Always `chat.completion`.")
    created: int = Field(description="Creation time (Unix seconds).")
    model: str = Field(description="The model that answered.")
    system_fingerprint: str | None = Field(None, description="Always null.")
    choices: list[ChatChoice] = Field(description="The generated choices.")
    usage: Usage = Field(description="Tokens used.")


class CompletionChoice(BaseModel):
    index: int = Field(description="Position among the choices (prompts x n).")
    text: str = Field(description="The generated text.")
    logprobs: None = Field(None, description="Always null (not supported).")
    finish_reason: str = Field(description="`stop` (a stop sequence or end of text) or `length`.")


class Completion(BaseModel):
    id: str = Field(description="The completion id (`cmpl-...`).")
    object: Literal["text_completion"] = Field("text_completion", description="Always `text_completion`.")
    created: int = Field(description="Creation time (Unix seconds).")
    model: str = Field(description="The model that answered.")
    system_fingerprint: str | None = Field(None, description="Always null.")
    choices: list[CompletionChoice] = Field(description="The generated choices.")
    usage: Usage = Field(description="Tokens used.")


class PredictionList(BaseModel):
    """`data[i]` has `index` plus `label`/`score`/`scores` (classification), `value` (regression)
    or `fills` (masked_lm: one list of top-k candidates per mask token)."""

    object: Literal["list"] = Field("list", description="Always `list`.")
    model: str = Field(description="The model that answered.")
    data: list[dict[str, Any]] = Field(description="One result per input, in input order.")
    usage: Usage = Field(description="Tokens of the inputs.")
