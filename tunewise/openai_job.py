"""`tunewise import openai-job JOB.json`: an OpenAI fine-tuning job (as the API returns it, or the create request) as a
tunewise.yaml that `tunewise train` accepts as written.

What maps, and by which rule:
- training_file / validation_file: file ids (`file-...`) are looked up in `files` (id -> local path, from --file), or
  as <id>.jsonl beside the job file; a local path is taken as it is;
- method.type supervised -> sft on data.format openai; dpo -> dpo on openai-preference; reinforcement -> grpo on
  openai-rft, its grader written to grader.json and used twice, as the GRPO reward and as an evaluation metric;
- hyperparameters (method.<type>.hyperparameters, else the legacy top-level ones): n_epochs -> training.epochs,
  batch_size -> training.batch_size, beta -> training.preference.beta, eval_interval -> training.eval_every,
  eval_samples -> training.eval_samples, learning_rate_multiplier m -> training.learning_rate = m x 2e-4 (OpenAI does not
  publish the base rate its multiplier scales; 2e-4 is the LoRA rate tunewise starts from, so a multiplier of 1 maps to
  our default); "auto" leaves the key unset, so tunewise picks it from the task and the data;
- seed -> training.seed; suffix -> the project name; fine_tuned_model -> serve.aliases (that name -> this project's
  production model), so clients keep the model name they send.
Everything else is named in the notes, with what was done instead; the notes head the written file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from .config import ConfigError, ProjectConfig

LORA_RATE = 2e-4
FORMAT_OF_METHOD = {"supervised": ("openai", "sft"), "dpo": ("openai-preference", "dpo"), "reinforcement": ("openai-rft", "grpo")}
KNOWN = {"object", "id", "model", "created_at", "finished_at", "fine_tuned_model", "organization_id", "result_files", "status",
         "validation_file", "training_file", "hyperparameters", "method", "trained_tokens", "integrations", "seed", "estimated_finish",
         "suffix", "metadata", "error", "user_provided_suffix", "usage_metrics", "shared_with_openai", "eval_id"}


class JobImportError(ConfigError):
    pass


def _file(job: dict, key: str, files: dict[str, str], job_dir: Path, where: str) -> str | None:
    ref = job.get(key)
    if ref in (None, ""):
        return None
    if ref in files:
        path = Path(files[ref])
    elif (job_dir / f"{ref}.jsonl").is_file():
        path = job_dir / f"{ref}.jsonl"
    elif Path(ref).is_file() or (job_dir / ref).is_file():
        path = Path(ref) if Path(ref).is_file() else job_dir / ref
    else:
        raise JobImportError(f"{where}: {key}: {ref!r} is an OpenAI file id with no local copy; download it (the API's "
                             f"GET /v1/files/{ref}/content) and pass --file {ref}=PATH, or save it as {ref}.jsonl beside the job file")
    if not path.is_file():
        raise JobImportError(f"{where}: {key}: {path}: file not found")
    return str(path.resolve())


def _tools_in(path: str) -> int:
    n = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if '"tool_calls"' in line or '"tools"' in line or '"function_call"' in line or '"role": "tool"' in line:
                n += 1
    return n


def _hyperparameters(hp: dict, t: dict, notes: list[str]) -> None:
    """The job's hyperparameters into training: (what each became, or why not) in notes."""
    for key, target in (("n_epochs", "epochs"), ("batch_size", "batch_size"), ("eval_interval", "eval_every"), ("eval_samples", "eval_samples")):
        v = hp.pop(key, None)
        if v is not None and v != "auto":
            t[target] = v
        elif v == "auto":
            notes.append(f"{key}: auto -> training.{target} left unset (tunewise picks it from the task and the data)")
    m = hp.pop("learning_rate_multiplier", None)
    if m is not None and m != "auto":
        t["learning_rate"] = float(m) * LORA_RATE
        notes.append(f"learning_rate_multiplier {m} -> training.learning_rate {t['learning_rate']:g} (the multiplier x 2e-4, "
                     "tunewise's LoRA rate; OpenAI does not publish the rate it scales)")
    elif m == "auto":
        notes.append("learning_rate_multiplier: auto -> training.learning_rate left unset (tunewise picks it)")
    beta = hp.pop("beta", None)
    if beta is not None and beta != "auto":
        t["preference"] = {"beta": float(beta)}
    for k, v in hp.items():
        notes.append(f"hyperparameters.{k} ({v}): no tunewise equivalent; not carried over")


def _reinforcement(details: dict, out: Path, raw: dict, has_validation: bool, notes: list[str], where: str) -> None:
    """A reinforcement job's grader: written beside the config, the GRPO reward and the evaluation metric."""
    t = raw["training"]
    grader = details.get("grader")
    if not isinstance(grader, dict):
        raise JobImportError(f"{where}: method.reinforcement.grader: missing (a reinforcement job is graded)")
    gpath = out.parent / "grader.json"
    gpath.parent.mkdir(parents=True, exist_ok=True)
    gpath.write_text(json.dumps(grader, indent=2) + "\n")
    t["grpo"] = {"rewards": [{"name": "grader", "args": {"file": gpath.name}}]}
    gname = grader.get("name") or grader.get("type")
    raw["evaluation"] = {"graders": [gpath.name], "metrics": ["exact_match"], "split": "validation" if has_validation else "test"}
    raw["goal"] = {"metric": gname}
    notes.append(f"grader ({grader.get('type')}) -> {gpath.name}: the GRPO reward (training.grpo.rewards) and the evaluation metric {gname!r}")
    for k in ("response_format",):
        if details.get(k) is not None:
            notes.append(f"method.reinforcement.{k}: not carried over (tunewise's GRPO samples free text; a grammar in serve can enforce a schema)")


def _serving_and_tracking(job: dict, raw: dict, project: str, notes: list[str]) -> None:
    """The fine-tuned model's name as a serve alias, the wandb integration, and what is not carried over."""
    if job.get("fine_tuned_model"):
        raw["serve"] = {"aliases": {job["fine_tuned_model"]: f"{project}:production"}}
        notes.append(f"fine_tuned_model {job['fine_tuned_model']} -> serve.aliases: clients that send it reach this project's production model")
    for integ in job.get("integrations") or []:
        if isinstance(integ, dict) and integ.get("type") == "wandb":
            raw["tracking"] = ["wandb"]
            notes.append("integrations wandb -> tracking: [wandb] (project and entity from WANDB_* variables)")
        else:
            notes.append(f"integrations {integ}: not carried over")
    for k in sorted(set(job) - KNOWN):
        notes.append(f"{k}: not a fine-tuning job field tunewise knows; ignored")
    if job.get("metadata"):
        notes.append("metadata: kept in the notes only")


def import_job(job_path: Path, files: dict[str, str] | None = None, model: str | None = None,
               out: Path | None = None) -> tuple[Path, list[str]]:
    """Write tunewise.yaml (and grader.json for reinforcement) from a job file; returns (config path, notes)."""
    where = str(job_path)
    try:
        job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise JobImportError(f"{where}: not a readable JSON job: {e}") from None
    if not isinstance(job, dict):
        raise JobImportError(f"{where}: expected a fine-tuning job object")
    if "training_file" not in job:
        raise JobImportError(f"{where}: training_file: missing (a fine-tuning job or its create request names it)")
    files = files or {}
    job_dir = Path(job_path).resolve().parent
    out = Path(out or job_dir / "tunewise.yaml")
    notes: list[str] = []

    method = job.get("method") or {"type": "supervised"}
    kind = method.get("type", "supervised")
    if kind not in FORMAT_OF_METHOD:
        raise JobImportError(f"{where}: method.type: {kind!r} is not one of {', '.join(FORMAT_OF_METHOD)}")
    fmt, objective = FORMAT_OF_METHOD[kind]
    details = method.get(kind) or {}
    hp = dict(details.get("hyperparameters") or {})
    legacy = job.get("hyperparameters") or {}
    for k, v in legacy.items():
        hp.setdefault(k, v)

    name = job.get("suffix") or job.get("user_provided_suffix") or job.get("id") or Path(job_path).stem
    project = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-.") or "imported"
    raw: dict = {"project": project, "output_dir": "runs", "data": {"format": fmt, "train": None}, "training": {"objective": objective}}
    raw["data"]["train"] = _file(job, "training_file", files, job_dir, where)
    val = _file(job, "validation_file", files, job_dir, where)
    if val:
        raw["data"]["validation"] = val
    raw["model"] = {"name": model or "bundled:smollm2-135m-instruct"}
    notes.append(f"model {job.get('model', '(none)')}: OpenAI's weights are not available; training uses model.name {raw['model']['name']}"
                 + ("" if model else " (import with --model to choose another)"))
    t = raw["training"]
    _hyperparameters(hp, t, notes)
    if job.get("seed") is not None:
        t["seed"] = int(job["seed"])

    if kind == "reinforcement":
        _reinforcement(details, out, raw, bool(val), notes, where)
    with_tools = _tools_in(raw["data"]["train"]) if kind == "supervised" else 0
    if with_tools:
        notes.append(f"training_file: {with_tools} records carry tools or tool calls: read, each call checked against "
                     "its tool's schema (a bad one is quarantined with its field), and trained in tunewise's text form (docs/data.md#tool-use); "
                     "`tunewise eval --suite bfcl` scores tool calls and `tunewise serve` answers with them")
    _serving_and_tracking(job, raw, project, notes)
    try:  # what we write must load: every key checked as `tunewise train` will
        ProjectConfig.model_validate({**raw, "data": {**raw["data"]}})
    except Exception as e:  # noqa: BLE001 - a bug of ours, said plainly
        raise JobImportError(f"{where}: the config written from it does not validate: {e}") from None
    header = [f"# Imported from the OpenAI fine-tuning job {job.get('id', job_path)} by `tunewise import openai-job`.",
              *(f"# - {n}" for n in notes), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header) + yaml.safe_dump(raw, sort_keys=False))
    return out, notes
