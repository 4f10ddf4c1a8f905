"""``egpu bench llm``: measure a served model through its host-side endpoint."""

from __future__ import annotations

import math

import click

from egpu.cli import output
from egpu.errors import UsageError
from egpu.vm import llmbench, serving, store

DEFAULT_PROMPT_TOKENS = 4096
DEFAULT_GEN_TOKENS = 256
DEFAULT_RUNS = 3


@click.group(name="bench")
def bench() -> None:
    """Measure what a VM serves."""  # tests/test_cli_lazy.py: the root table says the same


def _figure(value: float, unit: str, digits: int = 1) -> str:
    return "-" if not math.isfinite(value) else f"{value:.{digits}f} {unit}"


@bench.command(name="llm")
@click.argument("name", required=False)
@click.option("--endpoint", help="measure this OpenAI-compatible server instead of a VM's")
@click.option("--allow-remote", is_flag=True, help="let --endpoint be off this machine")
@click.option("--model", help="model name to ask for (default: the VM's served model)")
@click.option("--prompt-tokens", type=click.IntRange(1, llmbench.MAX_TOKENS),
              default=DEFAULT_PROMPT_TOKENS, show_default=True)
@click.option("--gen-tokens", type=click.IntRange(2, llmbench.MAX_TOKENS),
              default=DEFAULT_GEN_TOKENS, show_default=True)
@click.option("--runs", type=click.IntRange(1, llmbench.MAX_RUNS), default=DEFAULT_RUNS,
              show_default=True)
@click.option("--timeout", type=float, default=llmbench.DEFAULT_RUN_TIMEOUT_S,
              show_default=True, help="seconds one run may take")
@click.option("--json", "as_json", is_flag=True, help="print the figures as JSON")
def llm(name: str | None, endpoint: str | None, allow_remote: bool, model: str | None,
        prompt_tokens: int, gen_tokens: int, runs: int, timeout: float, as_json: bool) -> None:
    """Time to first token, prefill and decode tokens/s (medians over runs) of the model VM
    NAME serves, streamed through its forwarded port on 127.0.0.1."""
    if not math.isfinite(timeout) or timeout <= 0:
        raise UsageError(f"--timeout {timeout} must be a finite, positive number of seconds")
    if (name is None) == (endpoint is None):
        raise UsageError("give a VM NAME or --endpoint URL (one of them)")
    has_gpu = False
    if endpoint is not None:
        base = llmbench.check_endpoint(endpoint, allow_remote)
    else:
        assert name is not None
        record = serving.read(store.VmDir(store.check_name(name)).require())
        base, model, has_gpu = record.endpoint, model or record.model, record.has_gpu
    client = llmbench.Endpoint(base, model, run_timeout=timeout)
    progress = output.BarProgress(quiet=as_json)
    progress.start(f"{runs} runs of {prompt_tokens} + {gen_tokens} tokens", runs)
    try:
        summary = llmbench.measure(client, prompt_tokens, gen_tokens, runs,
                                   lambda: progress.advance(1))
    finally:
        progress.finish()
        client.close()
    if as_json:
        doc = {"endpoint": base, **summary.to_json()}
        if has_gpu:
            doc["blog"] = {"decode_tps": llmbench.BLOG_DECODE_TPS,
                           "prefill_4k_s": llmbench.BLOG_PREFILL_S}
        output.emit_json(doc)
        return
    rows = [
        ["time to first token", _figure(summary.ttft_s * 1000, "ms"), ""],
        [f"prefill ({summary.prompt_tokens} tokens)", _figure(summary.prefill_tps, "tok/s"),
         ""],
        ["decode", _figure(summary.decode_tps, "tok/s"),
         _figure(llmbench.BLOG_DECODE_TPS, "tok/s", 0) if has_gpu else ""],
    ]
    if has_gpu:
        rows.append([f"{llmbench.BLOG_PREFILL_TOKENS}-token prefill",
                     _figure(llmbench.blog_prefill_s(summary.prefill_tps) * 1000, "ms", 0),
                     _figure(llmbench.BLOG_PREFILL_S * 1000, "ms", 0)])
    output.table(["figure", f"median of {summary.runs}", "blog (vLLM, RTX 5090)"
                  if has_gpu else ""], rows)
    output.notice(f"{base}: {summary.gen_tokens} tokens generated per run, counted by "
                  f"{summary.counted_by}")


def register(group: click.Group) -> None:
    """Add this module's commands to the root group."""
    group.add_command(bench)
