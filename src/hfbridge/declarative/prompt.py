"""From a record (a row of the data set) to the model's prompt and to a training sample in a core format.

With ``chat`` on (the default for models that have a chat template) a record becomes a ``messages`` sample: an
optional system turn, the rendered prompt as the user turn and the target as the assistant turn. Otherwise it
becomes a ``prompt_completion`` sample whose completion is the target after one space. Either way the core's
:mod:`hfbridge.data.formats` tokenizes it, so training, scoring and generation see the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from hfbridge.declarative.schema import LLMConfig

Prompt = str | list[dict]


def value_text(value) -> str:
    """A cell as text (``None`` is empty)."""
    return "" if value is None else str(value)


def default_template(cfg: LLMConfig, chat: bool) -> str:
    """The template used when the config gives none: the task, the input columns, the labels of a category."""
    inputs = [f.name for f in cfg.input_features]
    lines = []
    if cfg.prompt.task:
        lines.append("{__task__}")
    if len(inputs) == 1 and not cfg.prompt.task:
        lines.append("{" + inputs[0] + "}")
    else:
        lines.extend(f"{name}: {{{name}}}" for name in inputs)
    if cfg.output_feature.type == "category":
        lines.append("Answer with one of: {__labels__}.")
    if not chat:
        lines.append(f"{cfg.output_feature.name}:")
    return "\n".join(lines)


@dataclass
class PromptRenderer:
    """Renders records with the config's prompt settings; ``chat`` is decided once, from the tokenizer."""

    config: LLMConfig
    chat: bool

    @classmethod
    def for_tokenizer(cls, config: LLMConfig, tokenizer) -> PromptRenderer:
        chat = config.prompt.chat
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat == "auto":
            chat = has_template
        elif chat and not has_template:
            raise ValueError("prompt.chat is true but the model's tokenizer has no chat template; set prompt.chat: "
                             "false (or auto)")
        return cls(config, bool(chat))

    @property
    def fmt(self) -> str:
        """The core data format the samples are in."""
        return "messages" if self.chat else "prompt_completion"

    @property
    def template(self) -> str:
        return self.config.prompt.template or default_template(self.config, self.chat)

    @property
    def target_name(self) -> str:
        return self.config.output_feature.name

    def render(self, record: dict) -> str:
        """The template filled with the record's columns (without few-shot examples or system text)."""
        values = {f.name: value_text(record.get(f.name)) for f in self.config.input_features}
        values["__task__"] = self.config.prompt.task or ""
        labels = self.config.output_feature.labels or []
        values["__labels__"] = ", ".join(labels)
        return self.template.format_map(values)

    @property
    def static_examples(self) -> list[dict]:
        """The examples every prompt shows unless it is given its own: the config's ``examples``, or none when they
        are a pool to retrieve from (``few_shot_retrieval: similarity``)."""
        prompt = self.config.prompt
        return [] if prompt.few_shot_retrieval == "similarity" else prompt.examples

    def _examples_text(self, examples: list[dict] | None) -> str:
        blocks = []
        for example in self.static_examples if examples is None else examples:
            answer = value_text(example.get(self.target_name))
            if self.chat:
                blocks.append(f"{self.render(example)}\nAnswer: {answer}")
            else:
                blocks.append(f"{self.render(example)} {answer}")
        return "".join(block + "\n\n" for block in blocks)

    def user_text(self, record: dict, examples: list[dict] | None = None) -> str:
        """The few-shot examples (``examples``, default :attr:`static_examples`), then the rendered record."""
        text = self._examples_text(examples) + self.render(record)
        if not self.chat and self.config.prompt.system:
            text = f"{self.config.prompt.system}\n\n{text}"
        return text

    def prompt(self, record: dict, examples: list[dict] | None = None) -> Prompt:
        """What generation is given: a string, or chat messages ending with the user turn."""
        text = self.user_text(record, examples)
        if not self.chat:
            return text
        messages = [{"role": "system", "content": self.config.prompt.system}] if self.config.prompt.system else []
        return [*messages, {"role": "user", "content": text}]

    def sample(self, record: dict, target: str | None = None, examples: list[dict] | None = None) -> dict:
        """A training sample in the core format :attr:`fmt`; the target defaults to the record's output column."""
        target = value_text(record.get(self.target_name)) if target is None else target
        prompt = self.prompt(record, examples)
        if self.chat:
            return {"messages": [*prompt, {"role": "assistant", "content": target}]}
        return {"prompt": prompt, "completion": f" {target}"}
