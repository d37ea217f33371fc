"""`evomerge` commands on models and endpoints: merge, zoo, eval, serve, fuse (the commands on runs
are in evomerge/cli.py; both register on evomerge/cli_base.py's app)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from evomerge.cli_base import DeviceOption, app, console, user_errors
from evomerge.errors import EvomergeError


@app.command()
@user_errors
def merge(
    config: Path = typer.Argument(..., help="An evomerge merge config (pool + recipe) or a mergekit YAML."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write the merged model to (must not exist)."),
    device: str = DeviceOption,
    dtype: Optional[str] = typer.Option(None, help="Output dtype: float32, float16, bfloat16 (default: the recipe's, else the base's)."),
    skip_value_check: bool = typer.Option(False, help="Skip the NaN/Inf scan of the experts (it reads every tensor once)."),
):
    """Merge a pool into one model directory.

    Example: evomerge merge examples/ties.yaml -o merged/ --dtype bfloat16
    """
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from evomerge.config import load_merge_config, open_pool
    from evomerge.materialize import write_adapter_dir, write_model_dir

    started = time.perf_counter()
    recipe, spec = load_merge_config(config)
    pool = open_pool(spec).validate(check_values=not skip_value_check)
    names = pool.tensor_names()
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        used = recipe.used_experts()  # what the merge takes from, not the size of the pool
        task = progress.add_task(f"merging {len(used)} experts ({recipe.method})", total=len(names))
        if recipe.lora_merge == "lowrank":
            write_adapter_dir(recipe, pool, output, device=device)
        else:
            write_model_dir(recipe, pool, output, device=device, dtype=dtype,
                            on_tensor=lambda _name: progress.advance(task))
    unused = [name for name in pool.experts if name not in used]
    note = (f"; {len(unused)} of the pool's {len(pool.experts)} unused (weight 0 or not in the recipe): "
            f"{', '.join(unused)}" if unused else "")
    console.print(f"merged {len(used)} expert{'s' if len(used) != 1 else ''} with {recipe.method} into {output} "
                  f"({len(names)} tensors, {time.perf_counter() - started:.1f}s, recipe {recipe.id}{note})",
                  highlight=False)


@app.command()
@user_errors
def zoo(
    output: Path = typer.Argument(..., help="Directory to build the demo pool in."),
    size: str = typer.Option("small", help="tiny (seconds, for tests) or small (minutes, for the demo)."),
    seed: int = typer.Option(0, help="Seed for data, pre-training and fine-tuning."),
    adapters: Optional[int] = typer.Option(None, "--adapters", help="Also build OUTPUT/many-N: N LoRA adapters, the "
                                           "4 relevant ones and N-4 distractors (some harmful), with nested pools "
                                           "pool-4/16/64/128.yaml (minutes on CPU)."),
):
    """Build the demo zoo on CPU: a tiny Llama base, full and LoRA experts per task, and their scores.

    Example: evomerge zoo runs/zoo --size tiny --adapters 128
    """
    from evomerge.zoo import build_zoo

    build_zoo(output, size=size, seed=seed, progress=True)
    if adapters is not None:
        from evomerge.zoo.repository import build_repository

        build_repository(output, adapters, seed=seed, progress=True)


@app.command()
@user_errors
def fuse(
    fusion: Path = typer.Argument(..., help="An exported fusion (export -o DIR writes DIR/fusion.yaml)."),
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="A prompt to answer; repeat for several."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Tokens per answer."),
    stop: list[str] = typer.Option(["\n"], "--stop", help="Stop strings (repeatable)."),
    task: Optional[str] = typer.Option(None, "--task", help="Which task's models answer (a per-task fusion, e.g. routing)."),
):
    """Answer prompts with a fusion of API models picked by a search (what `export` wrote for it).

    Example:
      evomerge fuse runs/fusion/export/fusion.yaml --prompt "add 12+34 ="
    """
    from evomerge.fusion.serve import fuse as answer

    answers, cost = answer(fusion / "fusion.yaml" if fusion.is_dir() else fusion, prompt, max_tokens, stop, task)
    for text in answers:
        print(text)
    console.print(f"{cost['calls']} API calls, {cost['prompt_tokens']} prompt + {cost['completion_tokens']} completion "
                  f"tokens, ${cost['serving_usd']:.4g}" + (f"; {cost['missing']} answers missing" if cost["missing"] else ""),
                  highlight=False)


@app.command()
@user_errors
def serve(
    pool: Path = typer.Argument(..., help="The pool YAML to hold (its weights never leave this machine)."),
    suite: Path = typer.Option(..., "--suite", help="The suite every recipe is scored on, e.g. evaluators/zoo-loss.yaml."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0 for every one)."),
    port: int = typer.Option(8765, "--port"),
    token_env: str = typer.Option("EVOMERGE_TOKEN", "--token-env", help="Environment variable holding the bearer token clients must send."),
    device: str = DeviceOption,
    batch_size: int = typer.Option(64, "--batch-size", help="Requests per forward pass (hf backend)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: all cores)."),
):
    """Hold a pool and score recipes on a suite over HTTP: searches elsewhere use `pool: {endpoint: URL}`.

    Example:
      EVOMERGE_TOKEN=s3cret evomerge serve zoo/pool-full.yaml --suite evaluators/zoo-loss.yaml
    """
    from evomerge.config import resolve_pool_spec
    from evomerge.provider import Provider, bind, make_server

    token = os.environ.get(token_env)
    if not token:
        raise EvomergeError(f"set ${token_env} to the bearer token clients must send (it is read from the environment only)")
    spec = resolve_pool_spec(str(pool), Path.cwd(), str(pool))
    listening = bind(host, port)
    provider = Provider(spec, suite, {"name": "hf", "batch_size": batch_size}, device=device, threads=threads)
    # markup=False: expert names and reasons come from clients' recipes (`[/]` would raise)
    server = make_server(provider, listening, token,
                         log=lambda line: console.print(line, highlight=False, markup=False))
    console.print(f"serving {len(provider.info['experts'])} experts ({', '.join(provider.info['experts'])}) "
                  f"scored on {provider.info['suite']} at http://{host}:{server.server_address[1]}",
                  highlight=False, markup=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# ---- eval (owned by the evaluator module) ---------------------------------------------------
# BEGIN eval command
@app.command("eval")
@user_errors
def eval_command(
    target: str = typer.Argument(..., help="A model dir (hf, vllm) or an OpenAI-compatible URL (http://host:port/v1)."),
    suite: Path = typer.Option(..., "--suite", help="A task suite, e.g. evaluators/zoo-loss.yaml."),
    split: Optional[str] = typer.Option(None, "--split", help="The split its dataset_path {split} stands for "
                                        "(default: the suite's `split:`), e.g. test."),
    backend: Optional[str] = typer.Option(None, "--backend", help="hf, openai or vllm (default: openai for a URL, else hf)."),
    device: str = DeviceOption,
    batch_size: int = typer.Option(16, "--batch-size", help="Requests per forward pass (hf)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Score at most this many docs per task (seeded subsample)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name at the endpoint (default: its first listed model)."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="Environment variable that holds the endpoint's API key."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the scores as JSON here."),
):
    """Score a model or an endpoint on a suite: per-task scores (higher is better) and the weighted scalar.

    Examples:
      evomerge eval zoo/base --suite evaluators/zoo-loss.yaml
      evomerge eval zoo/base --suite zoo-generate --split test
      evomerge eval http://localhost:8000/v1 --suite evaluators/zoo-generate.yaml --model my-model
    """
    import json

    from rich.table import Table

    from evomerge.backends import BACKENDS, build_backend
    from evomerge.evaluator import evaluate, load_suite

    is_url = target.startswith(("http://", "https://"))
    name = backend or ("openai" if is_url else "hf")
    BACKENDS.get(name)  # unknown names fail here, with did-you-mean
    loaded = load_suite(suite, split=split, limit=limit)  # every data/template check before any model work
    if name == "openai":
        if not is_url:
            raise EvomergeError(f"backend 'openai' needs a URL (http://host:port/v1), got {target!r}")
        engine = build_backend("openai", base_url=target, model=model, api_key_env=api_key_env)
    elif is_url:
        raise EvomergeError(f"backend {name!r} needs a model dir; for a URL use --backend openai")
    elif name == "hf":
        engine = build_backend("hf", model=target, device=device, batch_size=batch_size)
    else:
        engine = build_backend(name, model=target, device=device)
    try:
        result = evaluate(loaded, engine)
    finally:  # an engine process (vllm) stopped here, not at interpreter exit, where it aborted (-6)
        engine.close()

    table = Table(title=f"{suite}{f' ({loaded.split} split)' if loaded.split else ''} on {target} ({name})")
    for column in ("task", "type", "n", "weight", "metrics", "score", "seconds"):
        table.add_column(column, justify="left" if column in ("task", "type", "metrics") else "right")
    for task in result.tasks.values():
        metrics = ", ".join(f"{key} {value:.4f}" for key, value in task.metrics.items())
        table.add_row(task.task, task.output_type, str(task.n), f"{task.weight:g}", metrics,
                      f"{task.score:.4f}", f"{task.seconds:.2f}")
    table.add_row("[bold]suite[/]", "", "", "", "", f"[bold]{result.scalar:.4f}[/]", f"{result.seconds:.2f}")
    Console().print(table)
    console.print("scores are higher-is-better; a loss task scores -(mean cross-entropy per token)")
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        payload = {"target": target, "suite": str(suite), "split": loaded.split, **result.to_dict()}
        output.write_text(json.dumps(payload, indent=2) + "\n")
        console.print(f"wrote {output}")
# END eval command
