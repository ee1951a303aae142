"""Benchmark tasks through lm-evaluation-harness, offline.

Tasks come from lm-eval's registry when their data sets are already in the local
Hugging Face cache (nothing is downloaded at run time), or from task YAML files in
`--include-path` folders whose data files sit next to them. Local files are checked
first, so a bad one gets an error naming the file and line instead of a traceback
from deep inside lm-eval.
"""
from __future__ import annotations

import contextlib
import json
import os
import traceback
from dataclasses import dataclass
from pathlib import Path

import yaml

from .rows import EvalError, Row

OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling", "generate_until")
FILE_KEY = "__crofter_file__"  # where a local task came from (taken out before lm-eval sees it)


def _key_lines(path: Path) -> dict[str, int]:
    """1-based line of every top-level key (and of `dataset_kwargs.data_files`)."""
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"), Loader=_PlainLoader)
    except yaml.YAMLError:
        return {}
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            lines[str(k.value)] = k.start_mark.line + 1
            if k.value == "dataset_kwargs" and isinstance(v, yaml.MappingNode):
                for k2, _ in v.value:
                    lines[f"dataset_kwargs.{k2.value}"] = k2.start_mark.line + 1
            if k.value == "metric_list" and isinstance(v, yaml.SequenceNode):
                for i, item in enumerate(v.value):
                    lines[f"metric_list.{i}"] = item.start_mark.line + 1
    return lines


class _PlainLoader(yaml.SafeLoader):
    """Composes lm-eval's `!function` tags as plain scalars (only line numbers are wanted)."""


_PlainLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _check_jsonl(path: Path) -> None:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise EvalError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
                if not isinstance(row, dict):
                    raise EvalError(f"{path}:{lineno}: not a JSON object (a {type(row).__name__})")


def _first_row(path: Path) -> dict | None:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                return json.loads(line)
    return None


TEMPLATE_KEYS = ("doc_to_text", "doc_to_choice", "doc_to_target")


def _choices(rendered: str) -> None:
    """lm-eval reads a rendered doc_to_choice as a Python literal list."""
    import ast

    try:
        value = ast.literal_eval(rendered)
    except (ValueError, SyntaxError):
        value = None
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"renders to {rendered[:60]!r}, not a list of choices")


def _check_metrics(cfg: dict, path: Path, lines: dict[str, int]) -> None:
    """Metric and aggregation names lm-eval knows (an unknown metric would be fetched from the
    Hub by the `evaluate` library); `!function` entries are the user's own and pass."""
    import lm_eval.api.metrics  # noqa: F401 - fills the registries below (they are filled on import)
    from lm_eval.api.registry import AGGREGATION_REGISTRY, METRIC_REGISTRY

    for i, m in enumerate(cfg.get("metric_list") or []):
        line = lines.get(f"metric_list.{i}", lines.get("metric_list", 1))
        if not isinstance(m, dict) or "metric" not in m:
            raise EvalError(f"{path}:{line}: each metric_list entry needs a `metric:`")
        name, agg = m["metric"], m.get("aggregation")
        if isinstance(name, str) and name not in METRIC_REGISTRY:
            raise EvalError(f"{path}:{line}: metric {name!r}: choose one of {', '.join(sorted(METRIC_REGISTRY))}")
        if isinstance(agg, str) and agg not in AGGREGATION_REGISTRY:
            raise EvalError(f"{path}:{line}: aggregation {agg!r}: choose one of {', '.join(sorted(AGGREGATION_REGISTRY))}")


def _check_templates(cfg: dict, path: Path, lines: dict[str, int]) -> None:
    """Render the prompt templates on the first row of the scored split's JSONL file, so a
    field the data does not have (or a template that does not parse) names the task file's
    line, not a frame deep inside lm-eval."""
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    split = cfg.get("test_split") or cfg.get("validation_split")
    data = files.get(split) if isinstance(files, dict) else files
    data = data[0] if isinstance(data, list) and data else data
    if not isinstance(data, str) or not data.endswith(".jsonl") or cfg.get("process_docs"):
        return  # process_docs makes the fields the templates read: only lm-eval can render them
    row = _first_row(Path(data))
    if row is None:
        raise EvalError(f"{data}:1: no rows in the {split} split's data file")
    import jinja2
    from lm_eval.utils import env as lm_eval_env

    # lm-eval's own environment (its filters, e.g. regex_replace), strict about missing fields
    env = lm_eval_env.overlay(undefined=jinja2.StrictUndefined)
    for key in TEMPLATE_KEYS:
        tpl = cfg.get(key)
        if not isinstance(tpl, str) or ("{{" not in tpl and "{%" not in tpl):
            continue
        try:
            rendered = env.from_string(tpl).render(**row)
            if key == "doc_to_choice":
                _choices(rendered)
        except jinja2.UndefinedError as e:
            raise EvalError(f"{path}:{lines.get(key, 1)}: {key}: {e.message}; the first row of {data} has "
                            f"{', '.join(sorted(row)) or 'no fields'}") from None
        except jinja2.TemplateError as e:
            raise EvalError(f"{path}:{lines.get(key, 1)}: {key}: not a valid template ({e})") from None
        except Exception as e:  # noqa: BLE001 - what the template does with the row's values (int + str, ...)
            raise EvalError(f"{path}:{lines.get(key, 1)}: {key}: fails on the first row of {data} "
                            f"({type(e).__name__}: {e})") from None


def _fix_data_files(cfg: dict, path: Path, lines: dict[str, int]) -> None:
    """Relative data files are relative to the task file (HF datasets would read them from the cwd)."""
    kwargs = cfg.get("dataset_kwargs") or {}
    files = kwargs.get("data_files")
    if files is None:
        return
    line = lines.get("dataset_kwargs.data_files", lines.get("dataset_kwargs", 0))

    def fix(f):
        p = Path(str(f)).expanduser()
        p = p if p.is_absolute() else path.parent / p
        if not p.is_file():
            raise EvalError(f"{path}:{line}: data file {f} not found ({p})")
        if p.suffix == ".jsonl":
            _check_jsonl(p)
        return str(p)

    if isinstance(files, dict):
        kwargs["data_files"] = {k: [fix(x) for x in v] if isinstance(v, list) else fix(v) for k, v in files.items()}
    elif isinstance(files, list):
        kwargs["data_files"] = [fix(x) for x in files]
    else:
        kwargs["data_files"] = fix(files)
    cfg["dataset_kwargs"] = kwargs


def load_task_file(path: Path) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        cfg = load_yaml(path)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise EvalError(f"{path}:{mark.line + 1 if mark else 0}: not valid YAML ({e.problem or e})") from None
    except (OSError, ValueError, ImportError, AttributeError, yaml.YAMLError) as e:
        raise EvalError(f"{path}: {e}") from None
    lines = _key_lines(path)
    if "task" not in cfg and "group" not in cfg:
        raise EvalError(f"{path}:1: a task file needs a `task:` name")
    if "group" in cfg and "task" not in cfg:
        return cfg
    if not isinstance(cfg["task"], str):
        return cfg  # a group listing its tasks under `task:`; lm-eval resolves it
    ot = cfg.get("output_type", "generate_until")
    if ot not in OUTPUT_TYPES:
        raise EvalError(f"{path}:{lines.get('output_type', 1)}: output_type {ot!r}: choose one of {', '.join(OUTPUT_TYPES)}")
    for key in ("dataset_path", "doc_to_text"):
        if key not in cfg:
            raise EvalError(f"{path}:1: `{key}` is missing")
    if not any(cfg.get(s) for s in ("test_split", "validation_split")):
        raise EvalError(f"{path}:1: name the split to score with `test_split` or `validation_split`")
    _check_metrics(cfg, path, lines)
    _fix_data_files(cfg, path, lines)
    _check_templates(cfg, path, lines)
    cfg[FILE_KEY] = str(path)
    return cfg


def local_tasks(include_paths: list[str | Path]) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for root in include_paths:
        root = Path(root)
        if not root.is_dir():
            raise EvalError(f"--include-path {root}: not a folder")
        for f in sorted(root.rglob("*.yaml")) + sorted(root.rglob("*.yml")):
            cfg = load_task_file(f)
            name = cfg.get("task") if isinstance(cfg.get("task"), str) else cfg.get("group")
            if isinstance(name, str):
                found[name] = cfg
    return found


@contextlib.contextmanager
def _offline():
    """HF datasets reads only its local cache while tasks load."""
    import datasets.config as dc
    import huggingface_hub.constants as hc

    saved = (os.environ.get("HF_DATASETS_OFFLINE"), dc.HF_HUB_OFFLINE, hc.HF_HUB_OFFLINE)
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    dc.HF_HUB_OFFLINE = hc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if saved[0] is None:
            os.environ.pop("HF_DATASETS_OFFLINE", None)
        else:
            os.environ["HF_DATASETS_OFFLINE"] = saved[0]
        dc.HF_HUB_OFFLINE, hc.HF_HUB_OFFLINE = saved[1], saved[2]


@dataclass
class TaskRun:
    rows: list[Row]                 # one per metric, with lm-eval's standard error
    picks: dict[str, list[int]]     # multiple-choice tasks: the choice picked for each item, in item order


def run_tasks(lm, names: list[str], model: str, include_paths: list[str | Path] = (), limit: int | None = None,
              num_fewshot: int | None = None, bootstrap_iters: int = 1000, local: dict | None = None) -> TaskRun:
    """Evaluate `lm` (an lm-eval LM) on the named tasks."""
    import logging

    import lm_eval
    from lm_eval.tasks import TaskManager

    local = local_tasks(list(include_paths)) if local is None else local
    registry = [n for n in names if n not in local]
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    files = [local[n][FILE_KEY] for n in names if n in local and FILE_KEY in local[n]]
    specs = [{k: v for k, v in local[n].items() if k != FILE_KEY} if isinstance(local[n].get("task"), str) else n
             for n in names if n in local] + registry
    tm = TaskManager(include_path=[str(p) for p in include_paths] or None, include_defaults=bool(registry))
    if registry:
        known = set(tm.all_tasks)
        unknown = [n for n in registry if n not in known]
        if unknown:
            raise EvalError(f"unknown task {unknown[0]!r}: not in lm-eval's registry nor in --include-path")
    with _offline():
        try:
            res = lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=tm, limit=limit,
                                          num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters,
                                          log_samples=True)
        except (ConnectionError, OSError) as e:
            raise EvalError(f"a task's data set is not in the local Hugging Face cache and crofter does not "
                            f"download at run time ({str(e).splitlines()[0][:160]}); use --include-path with "
                            "local task files") from None
        except EvalError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, SyntaxError, AttributeError) as e:
            # What lm-eval meets in a local task's own settings or data while it builds or scores
            # it (the error arose inside lm-eval, jinja2 or datasets, not in a model): named by file.
            inner = traceback.extract_tb(e.__traceback__)[-1].filename
            if not files or not any(f"{os.sep}{pkg}{os.sep}" in inner for pkg in ("lm_eval", "jinja2", "datasets")):
                raise
            raise EvalError(f"{', '.join(files)}: lm-eval could not run the task ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else 'no message'})") from e
    picks = {}
    for task, samples in (res.get("samples") or {}).items():
        if samples and isinstance(samples[0].get("filtered_resps"), list) and samples[0]["filtered_resps"] and \
                isinstance(samples[0]["filtered_resps"][0], (tuple, list)):
            ordered = sorted(samples, key=lambda x: x["doc_id"])
            picks[task] = [max(range(len(x["filtered_resps"])), key=lambda i: x["filtered_resps"][i][0]) for x in ordered]
    return TaskRun(result_rows(res, model), picks)


def result_rows(res: dict, model: str) -> list[Row]:
    rows = []
    for task, metrics in res["results"].items():
        n = int(res.get("n-samples", {}).get(task, {}).get("effective", 0))
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            se = metrics.get(f"{metric}_stderr,{filt}")
            name = metric if filt == "none" else f"{metric}:{filt}"
            rows.append(Row(model, "tasks", task, name, float(value),
                            float(se) if isinstance(se, (int, float)) else None, n))
    return rows
