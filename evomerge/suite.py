"""Suite: a task suite's format (`evaluators/*.yaml` + local JSONL), loading and templates.

The format uses lm-evaluation-harness's words (task, dataset_path, output_type, doc_to_text,
doc_to_target, doc_to_choice, num_fewshot, generation_kwargs.until, metric_list). A top-level
`defaults:` mapping is merged under every task (a task's own keys win), and a `dataset_path` may
hold `{split}`: the suite's `split:` by default, another one with `load_suite(path, split=...)`,
`evomerge eval --split`, or a `NAME:SPLIT` suite reference (`suite: zoo-loss:test`). Every check on
the user's input (files, JSONL lines, template fields) happens in `load_suite`, before any model
work, and fails with one EvomergeError line. Scoring a suite is evomerge/evaluator.py's.

    suite = load_suite("zoo-loss")                  # or "zoo-loss:test", split="test"
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import jinja2
import jinja2.meta
from pydantic import Field, PrivateAttr, ValidationError, model_validator

from evomerge.errors import ConfigError, validation_message
from evomerge.schema import Frozen
from evomerge.recipe import load_yaml_text

OutputType = Literal["loss", "generate_until", "multiple_choice"]
MetricName = Literal["loss", "exact_match", "regex", "contains", "acc", "acc_norm"]

# Which metrics each output type can report, and which one it reports when metric_list is empty.
METRICS_FOR: dict[str, tuple[str, ...]] = {
    "loss": ("loss",),
    "generate_until": ("exact_match", "regex", "contains"),
    "multiple_choice": ("acc", "acc_norm"),
}
LOWER_IS_BETTER = {"loss"}


# ---- the suite format ---------------------------------------------------------------------------


class MetricSpec(Frozen):
    metric: MetricName
    regex_pattern: Optional[str] = None  # regex: the answer is group 1 (or the whole match)
    ignore_case: bool = False
    aggregation: Literal["mean"] = "mean"
    higher_is_better: Optional[bool] = None  # informative; fixed by the metric

    @model_validator(mode="after")
    def _check(self):
        if self.metric == "regex":
            if not self.regex_pattern:
                raise ValueError("metric 'regex' needs regex_pattern")
            try:
                re.compile(self.regex_pattern)
            except re.error as error:
                raise ValueError(f"regex_pattern {self.regex_pattern!r} does not compile: {error}") from None
        elif self.regex_pattern is not None:
            raise ValueError(f"regex_pattern only applies to metric 'regex', not {self.metric!r}")
        expected = self.metric not in LOWER_IS_BETTER
        if self.higher_is_better is not None and self.higher_is_better != expected:
            raise ValueError(f"metric {self.metric!r} has higher_is_better: {expected}")
        return self


class GenerationKwargs(Frozen):
    until: list[str] = Field(default_factory=lambda: ["\n"])
    max_gen_toks: int = Field(64, ge=1)


class TaskConfig(Frozen):
    task: str = Field(min_length=1)
    dataset_path: str  # JSONL, relative to the suite file
    output_type: OutputType = "loss"
    doc_to_text: str
    doc_to_target: Union[str, int]
    doc_to_choice: Union[str, list[str], None] = None
    description: str = ""  # prepended to every prompt
    num_fewshot: int = Field(0, ge=0)
    fewshot_path: Optional[str] = None  # JSONL; default: the task's own data, minus the doc itself
    fewshot_delimiter: str = "\n\n"
    target_delimiter: str = " "
    limit: Optional[int] = Field(None, ge=1)  # seeded subsample of this many docs
    generation_kwargs: GenerationKwargs = Field(default_factory=GenerationKwargs)
    metric_list: list[MetricSpec] = Field(default_factory=list)
    apply_chat_template: bool = False
    weight: float = Field(1.0, ge=0)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self):
        allowed = METRICS_FOR[self.output_type]
        for spec in self.metric_list:
            if spec.metric not in allowed:
                raise ValueError(
                    f"metric {spec.metric!r} does not apply to output_type {self.output_type!r}"
                    f" (use {', '.join(allowed)})"
                )
        if self.output_type == "multiple_choice" and self.doc_to_choice is None:
            raise ValueError("output_type 'multiple_choice' needs doc_to_choice")
        return self

    @property
    def metrics(self) -> list[MetricSpec]:
        return self.metric_list or [MetricSpec(metric=METRICS_FOR[self.output_type][0])]


class Suite(Frozen):
    """A validated suite with its data loaded (build it with `load_suite`)."""

    tasks: list[TaskConfig]
    seed: int = 1234
    split: Optional[str] = Field(None, min_length=1)  # what `{split}` in a dataset_path stands for
    description: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)

    _path: Optional[Path] = PrivateAttr(None)
    _docs: dict[str, list[dict]] = PrivateAttr(default_factory=dict)
    _fewshot: dict[str, list[dict]] = PrivateAttr(default_factory=dict)

    @property
    def path(self) -> Optional[Path]:
        return self._path

    def docs(self, task: str) -> list[dict]:
        return self._docs[task]

    @property
    def task_names(self) -> list[str]:
        return [t.task for t in self.tasks]


# ---- loading and checking -----------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSONL file; a bad line is one error naming file:line."""
    return [record for _, record in read_jsonl_lines(path)]


def read_jsonl_lines(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of every record of a JSONL file (blank lines skipped), so that later
    checks can name file:line too."""
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist")
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{path}:{number}: not valid JSON ({error.msg}, column {error.colno})") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            records.append((number, record))
    if not records:
        raise ConfigError(f"data file {path} has no records")
    return records


def load_suite(path: str | Path, *, split: Optional[str] = None, limit: Optional[int] = None) -> Suite:
    """Read, validate and load a suite YAML and its data. `path` is a file or a shipped suite's name,
    either one optionally followed by `:SPLIT` (`zoo-loss:test`); `split` picks the split too
    (default: the suite's `split:`). `limit` caps every task's doc count."""
    path, named = _suite_path(path)
    if named is not None and split is not None and named != split:
        raise ConfigError(f"suite {path}: two splits asked for, {named!r} (in its name) and {split!r}")
    raw = load_yaml_text(path.read_text(encoding="utf-8"), f"suite {path}")
    suite = suite_from_dict(raw, base_dir=path.parent, name=str(path), split=split or named, limit=limit)
    suite._path = path
    return suite


def _suite_path(path: str | Path) -> tuple[Path, Optional[str]]:
    """A suite file, or the name of a shipped one (`zoo-loss` -> evaluators/zoo-loss.yaml), and the
    split a `:SPLIT` after either names (None without one)."""
    from evomerge.shipped import shipped_dir

    def find(candidate: Path) -> Optional[Path]:
        if candidate.is_file():
            return candidate
        shipped = shipped_dir("evaluators") / f"{candidate.name.removesuffix('.yaml')}.yaml"
        return shipped if candidate.parent == Path(".") and shipped.is_file() else None

    found = find(Path(path))
    if found is not None:
        return found, None
    head, colon, split = str(path).rpartition(":")
    if colon and head and split and not set("/\\") & set(split):
        found = find(Path(head))
        if found is not None:
            return found, split
    names = sorted(p.stem for p in shipped_dir("evaluators").glob("*.yaml"))
    raise ConfigError(f"suite {path} does not exist (shipped suites, by name: {', '.join(names)})")


def suite_from_dict(
    raw: Any, *, base_dir: str | Path = ".", name: str = "suite", split: Optional[str] = None,
    limit: Optional[int] = None,
) -> Suite:
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping with a 'tasks:' list")
    if not raw.get("tasks"):
        raise ConfigError(f"{name}: the suite is empty (add at least one entry under 'tasks:')")
    raw, split_of = _with_defaults_and_split(raw, name, split)
    if limit is not None:
        raw = {**raw, "tasks": [{**t, "limit": min(limit, t.get("limit") or limit)} for t in raw["tasks"]]}
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{name}: {validation_message(error, limit=3)}") from None
    seen = set()
    for task in suite.tasks:
        if task.task in seen:
            raise ConfigError(f"{name}: task {task.task!r} appears twice")
        seen.add(task.task)
    if sum(t.weight for t in suite.tasks) <= 0:
        raise ConfigError(f"{name}: task weights sum to 0")
    base_dir = Path(base_dir)
    for position, task in enumerate(suite.tasks):
        data_path = base_dir / task.dataset_path
        if not data_path.is_file():
            which = f" (split {suite.split!r})" if position in split_of else ""
            raise ConfigError(f"task {task.task!r}: dataset_path {data_path}{which} does not exist")
        numbered = read_jsonl_lines(data_path)
        _check_templates(task, numbered, data_path)
        docs = [record for _, record in numbered]
        suite._docs[task.task] = docs
        if task.num_fewshot:
            shots_path = base_dir / task.fewshot_path if task.fewshot_path else data_path
            if task.fewshot_path:
                numbered_shots = read_jsonl_lines(shots_path)
                _check_templates(task, numbered_shots, shots_path)
            shots = [record for _, record in numbered_shots] if task.fewshot_path else docs
            needed = task.num_fewshot + (0 if task.fewshot_path else 1)
            if len(shots) < needed:
                raise ConfigError(
                    f"task {task.task!r}: num_fewshot {task.num_fewshot} needs {needed} records"
                    f" in {shots_path}, it has {len(shots)}"
                )
            suite._fewshot[task.task] = shots
    return suite


def _with_defaults_and_split(raw: dict, name: str, split: Optional[str]) -> tuple[dict, set[int]]:
    """The suite mapping with `defaults:` merged under every task (a task's own keys win) and
    `{split}` in each dataset_path replaced; also the positions of the tasks whose path holds it."""
    raw, defaults = {k: v for k, v in raw.items() if k != "defaults"}, raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{name}: defaults: expected a mapping of task keys (output_type, doc_to_text, ...)")
    keys = {str(key) for key in defaults}
    unknown = sorted(keys - set(TaskConfig.model_fields) | ({"task"} & keys))
    if unknown:
        why = "each task names itself" if unknown[0] == "task" else "unknown key (typo?)"
        raise ConfigError(f"{name}: defaults.{unknown[0]}: {why}")
    if not isinstance(raw["tasks"], list):
        raise ConfigError(f"{name}: tasks: expected a list of tasks")
    tasks = [{**defaults, **t} if isinstance(t, dict) else t for t in raw["tasks"]]
    split_of = {i for i, t in enumerate(tasks)
                if isinstance(t, dict) and isinstance(t.get("dataset_path"), str) and "{split}" in t["dataset_path"]}
    split = split or raw.get("split")
    if split_of and not (isinstance(split, str) and split):
        raise ConfigError(f"{name}: a dataset_path holds {{split}}: set `split:` in the suite, or pick one "
                          "(--split, or a suite reference NAME:SPLIT)")
    if not split_of and split is not None and split != raw.get("split"):
        raise ConfigError(f"{name}: split {split!r} asked for, but no dataset_path holds {{split}}")
    if split_of:
        tasks = [{**t, "dataset_path": t["dataset_path"].replace("{split}", split)} if i in split_of else t
                 for i, t in enumerate(tasks)]
        raw["split"] = split
    return {**raw, "tasks": tasks}, split_of


# ---- templates (lm-eval semantics: "{{ ... }}" is jinja2, anything else names a field) ----------

_JINJA = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
_COMPILED: dict[str, jinja2.Template] = {}


def _is_jinja(template: str) -> bool:
    return "{{" in template or "{%" in template


def _fields(template: str) -> set[str]:
    if _is_jinja(template):
        return jinja2.meta.find_undeclared_variables(_JINJA.parse(template))
    return {template}


def render(template: Any, doc: dict) -> Any:
    """Apply a doc_to_* template to one record (field name, jinja2 template, int or list)."""
    if not isinstance(template, str):
        return template
    if not _is_jinja(template):
        return doc[template]
    compiled = _COMPILED.get(template)
    if compiled is None:
        compiled = _COMPILED[template] = _JINJA.from_string(template)
    return compiled.render(**doc)


def _check_templates(task: TaskConfig, docs: list[tuple[int, dict]], data_path: Path) -> None:
    """Every record (not a sample: one record without a field would fail every candidate of a
    search, for its whole budget), against every template of the task; one line naming file:line."""
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        template = getattr(task, key)
        if not isinstance(template, str):
            continue
        try:
            names = _fields(template)
        except jinja2.TemplateSyntaxError as error:
            raise ConfigError(f"task {task.task!r}: {key} is not a valid jinja2 template ({error})") from None
        for number, doc in docs:
            missing = sorted(names - set(doc))
            if missing:
                raise ConfigError(
                    f"{data_path}:{number}: record has no field {missing[0]!r}, which task {task.task!r}'s {key}"
                    f" uses (fields: {', '.join(sorted(doc))})"
                )
            try:
                render(template, doc)
                if key == "doc_to_choice":
                    _choices(task, doc)
                elif key == "doc_to_target" and task.output_type == "multiple_choice":
                    _target_index(task, doc)
            except (jinja2.UndefinedError, jinja2.TemplateError, TypeError, ValueError, KeyError) as error:
                raise ConfigError(f"{data_path}:{number}: task {task.task!r}'s {key} fails on this record: {error}") from None


def _choices(task: TaskConfig, doc: dict) -> list[str]:
    value = render(task.doc_to_choice, doc)
    if isinstance(value, str):
        value = ast.literal_eval(value)
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"doc_to_choice must give a non-empty list, got {value!r}")
    return [str(choice) for choice in value]


def _target_index(task: TaskConfig, doc: dict) -> int:
    choices = _choices(task, doc)
    target = render(task.doc_to_target, doc)
    if isinstance(target, str) and target.strip().lstrip("-").isdigit() and target not in choices:
        target = int(target)
    if isinstance(target, int):
        if not 0 <= target < len(choices):
            raise ValueError(f"target index {target} out of range for {len(choices)} choices")
        return target
    if str(target) not in choices:
        raise ValueError(f"target {target!r} is not one of the choices {choices}")
    return choices.index(str(target))
