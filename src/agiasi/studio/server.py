"""The studio's web server: one page, a JSON API over the same configs and stage functions the
CLI uses, and server-sent events that replay and then follow a run's ``metrics.jsonl``.

Security, in one place (:func:`create_app`'s middleware): a request without the token (when
there is one) is refused; on a loopback bind the ``Host`` must be the loopback address (a web
page elsewhere cannot reach the studio through DNS rebinding); a state-changing request must be
a POST from this page's own origin carrying the page's header (a form on another site can send
neither). Paths are checked by :mod:`agiasi.studio.paths`; every text from models and data
reaches the page as JSON and is put in it with ``textContent`` (never as markup).

FastAPI reads the endpoints' annotations at import time, so its names are imported at the top:
this module is imported only by ``agiasi studio`` (the ``studio`` extra).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from agiasi.errors import AgiasiError
from agiasi.studio import forms, paths, runs

UPLOADS = "uploads"
UPLOAD_LIMIT = 2 * 2**30  # bytes a single upload may have
POLL_S = 0.25  # how often an open event stream looks at the metrics file
HEADER = "x-agiasi-studio"  # every state-changing request from the page carries it


def _train_config_cls():
    from agiasi.train.config import TrainConfig

    return TrainConfig


def create_app(root: Path, token: str | None = None, loopback_port: int | None = None):
    """The FastAPI app serving ``root``. ``loopback_port``: the port of a loopback bind (the
    ``Host`` header is then checked); None for a bind reached by other hosts (the token is)."""
    from agiasi.studio.pages import render_page

    root = Path(root).resolve()
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")
    hosts = (
        {f"{h}:{loopback_port}" for h in ("127.0.0.1", "localhost", "[::1]")}
        if loopback_port
        else None
    )

    def refuse(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if hosts is not None and request.headers.get("host", "") not in hosts:
            return refuse(403, "this studio answers only on its loopback address")
        given = request.query_params.get("token")
        if token is not None:
            sent = given or request.cookies.get("agiasi_token") or request.headers.get(HEADER)
            if not (isinstance(sent, str) and secrets.compare_digest(sent, token)):
                return refuse(401, "this studio needs its token: open the URL it printed")
        if request.method not in ("GET", "HEAD"):
            origin = request.headers.get("origin")
            own = f"{request.url.scheme}://{request.headers.get('host', '')}"
            if origin != own or request.headers.get(HEADER) is None:
                return refuse(403, "a change must come from the studio's own page")
        response = await call_next(request)
        if token is not None and given:
            response.set_cookie("agiasi_token", token, httponly=True, samesite="strict")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.exception_handler(AgiasiError)
    async def agiasi_error(request: Request, e: AgiasiError):
        return refuse(400, str(e))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):  # a bug: one line, as the CLI says
        return refuse(500, f"internal error: {type(e).__name__}: {str(e)[:300]}")

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request, lang: str | None = None):
        chosen = lang if lang in ("ja", "en") else request.cookies.get("agiasi_lang")
        if chosen not in ("ja", "en"):
            accept = request.headers.get("accept-language", "").lower()
            chosen = "ja" if accept.startswith("ja") else "en"
        from agiasi.eval.perplexity import EvalConfig
        from agiasi.export.config import ExportConfig

        eval_schema = forms.form_schema(EvalConfig, groups={})
        eval_schema = [{**g, "fields": [f for f in g["fields"] if f["name"] != "report"]}
                       for g in eval_schema]  # fmt: skip
        html = render_page(chosen, forms.form_schema(_train_config_cls()), str(root),
                           forms.form_schema(ExportConfig, groups={}), eval_schema)  # fmt: skip
        response = HTMLResponse(html)
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"
        )
        if lang in ("ja", "en"):
            response.set_cookie("agiasi_lang", lang, samesite="strict")
        return response

    # ------------------------------------------------------------------ model and data

    @app.get("/api/info")
    def model_info(model: str):
        from agiasi.info import describe

        return describe(paths.check_model(root, model))

    @app.get("/api/shipped")
    def shipped():
        from agiasi.shipped import default_dataset, default_heldout, tiny_model_path

        return {
            "model": str(tiny_model_path()),
            "dataset": str(default_dataset()),
            "heldout": str(default_heldout()),
        }

    @app.get("/api/files")
    def files(dir: str = ""):  # noqa: A002 - the query's name
        folder = paths.resolve(root, dir or ".", what="folder")
        if not folder.is_dir():
            raise AgiasiError(f"{dir!r} is not a folder under the root")
        entries = []
        for p in sorted(folder.iterdir(), key=lambda p: (not p.is_dir(), p.name)):
            if p.name.startswith("."):
                continue
            try:
                entries.append({"name": paths.relative(root, p), "dir": p.is_dir(),
                                "size": None if p.is_dir() else p.stat().st_size})  # fmt: skip
            except (ValueError, OSError):  # a link out of the root: not shown
                continue
        return {"dir": paths.relative(root, folder), "entries": entries}

    @app.post("/api/upload")
    async def upload(request: Request, name: str):
        safe = Path(name).name
        if not safe or safe != name or safe.startswith("."):
            raise AgiasiError(f"upload name {name!r}: a plain file name, please")
        dest = paths.resolve(root, f"{UPLOADS}/{safe}", write=True, what="upload")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{safe}.part")
        size = 0
        with open(tmp, "wb") as fh:
            async for chunk in request.stream():
                size += len(chunk)
                if size > UPLOAD_LIMIT:
                    fh.close()
                    tmp.unlink(missing_ok=True)
                    raise AgiasiError(f"upload larger than {UPLOAD_LIMIT // 2**30} GiB refused")
                fh.write(chunk)
        tmp.replace(dest)
        return {"name": paths.relative(root, dest), "size": size}

    @app.post("/api/data")
    def data_preview(body: dict[str, Any]):
        from agiasi.data.preview import DataConfig, summarize

        values = {k: v for k, v in body.items() if v not in (None, "")}
        if "dataset" not in values:
            raise AgiasiError("choose a dataset first")
        values["dataset"] = paths.check_datasets(root, str(values["dataset"]), "dataset")
        if values.get("base_model"):
            values["base_model"] = paths.check_model(root, str(values["base_model"]))
        cfg = forms.config_from_form(
            DataConfig,
            {k: v for k, v in values.items() if k != "json"},
            "agiasi data",
            ("dataset",),
        )
        return summarize(cfg)

    # ------------------------------------------------------------------ the training form

    def train_config(values: dict[str, Any]):
        values = {k: v for k, v in values.items() if v not in (None, "")}
        if values.get("base_model"):
            values["base_model"] = paths.check_model(root, str(values["base_model"]))
        for key in ("dataset", "eval_dataset"):
            if values.get(key):
                values[key] = paths.check_datasets(
                    root, str(values[key]), f"--{key.replace('_', '-')}"
                )
        if values.get("init_from"):
            values["init_from"] = str(
                paths.resolve(root, str(values["init_from"]), what="--init-from")
            )
        out = paths.resolve(root, str(values.get("output_dir") or "checkpoints_agiasi"),
                            write=True, what="--output-dir")  # fmt: skip
        values["output_dir"] = paths.relative(root, out)
        return forms.config_from_form(_train_config_cls(), values)

    def command_of(cfg) -> dict[str, Any]:
        flags = forms.flags_of(cfg)
        return {"flags": flags, "command": forms.shell_line(["agiasi", "train", *flags]),
                "yaml": forms.yaml_of(cfg), "output_dir": cfg.output_dir}  # fmt: skip

    @app.post("/api/command")
    def command(body: dict[str, Any]):
        return command_of(train_config(body.get("values") or {}))

    @app.post("/api/estimate")
    def estimate(body: dict[str, Any]):
        from agiasi.train.estimate import estimate_with_data, gpu_memory_here

        e, plan = estimate_with_data(train_config(body.get("values") or {}))
        return {**e.as_dict(), "data": plan, "gpu": gpu_memory_here()}

    @app.post("/api/runs")
    def start(body: dict[str, Any]):
        cfg = train_config(body.get("values") or {})
        busy = runs.any_running(root)
        if busy and not body.get("force"):
            return JSONResponse({"warning": "busy", "running": busy}, status_code=409)
        shown = command_of(cfg)
        meta = {"max_steps": cfg.max_steps, "method": cfg.method, "command": shown["command"]}
        pid = runs.start_run(root, cfg.output_dir, shown["flags"], False, meta)
        return {**shown, "pid": pid, "run": cfg.output_dir}

    def run_dir(name: str) -> str:
        folder = paths.resolve(root, name, write=True, what="run")
        return paths.relative(root, folder)

    @app.post("/api/runs/stop")
    def stop(body: dict[str, Any]):
        return {"pid": runs.stop_run(root, run_dir(str(body.get("run", ""))))}

    @app.post("/api/runs/resume")
    def resume(body: dict[str, Any]):
        from agiasi.checkpoint.step_folder import TRAIN_CONFIG

        rel = run_dir(str(body.get("run", "")))
        saved = runs._read_json(root / rel / TRAIN_CONFIG)
        if saved is None:
            raise AgiasiError(f"{rel} has no {TRAIN_CONFIG}: nothing to resume")
        values = {k: v for k, v in saved.items() if k not in forms.HIDDEN}
        if body.get("max_steps"):
            values["max_steps"] = body["max_steps"]
        cfg = train_config(values)
        busy = [r for r in runs.any_running(root) if r != rel]
        if busy and not body.get("force"):
            return JSONResponse({"warning": "busy", "running": busy}, status_code=409)
        shown = command_of(cfg)
        meta = {"max_steps": cfg.max_steps, "method": cfg.method,
                "command": shown["command"] + " --resume auto"}  # fmt: skip
        pid = runs.start_run(root, rel, shown["flags"], True, meta)
        return {**shown, "pid": pid, "run": rel}

    # ------------------------------------------------------------------ watching

    @app.get("/api/runs")
    def list_runs():
        return {"runs": runs.find_runs(root)}

    @app.get("/api/run")
    def one_run(run: str):
        rel = run_dir(run)
        state = runs.run_state(root, rel)
        log = runs.log_path(root, rel)
        state["log"] = runs.tail_lines(log, 40)
        launch = runs._read_json(runs.launch_path(root, rel)) or {}
        state["command"] = launch.get("command")
        state["started"] = launch.get("started")
        # what the run produced, found from the files on disk (a restart loses nothing)
        state["exports"] = [e for e in exports.find_exports(root)
                            if runs.inside(root, e.get("checkpoint"), rel)]  # fmt: skip
        state["evals"] = [e for e in evals.find_evals(root)
                          if any(runs.inside(root, m, rel) for m in e.get("models") or [])]  # fmt: skip
        return state

    @app.get("/api/events")
    async def events(request: Request, run: str):
        rel = run_dir(run)
        metrics = root / rel / runs.METRICS
        last = request.headers.get("last-event-id", "")
        skip = int(last) + 1 if last.isdigit() else 0

        async def stream():
            yield "retry: 1000\n\n"
            offset, line_no, state, tick, first = 0, 0, None, 0, skip
            while not await request.is_disconnected():
                try:
                    size = metrics.stat().st_size
                except OSError:
                    size = 0
                if size < offset:  # trimmed by a resume: the history restarts
                    offset, line_no, first = 0, 0, 0
                    yield "event: reset\ndata: {}\n\n"
                if size > offset:
                    with open(metrics, "rb") as fh:
                        fh.seek(offset)
                        chunk = fh.read(size - offset)
                    end = chunk.rfind(b"\n") + 1  # only whole lines
                    offset += end
                    for raw in chunk[:end].splitlines():
                        if line_no >= first:
                            text = raw.decode("utf-8", "replace")
                            yield f"id: {line_no}\nevent: metric\ndata: {text}\n\n"
                        line_no += 1
                if tick % 4 == 0:  # the run's state once a second
                    now = await asyncio.to_thread(runs.run_state, root, rel)
                    keys = ("state", "step", "max_steps", "error", "saved_step")
                    summary = {k: now.get(k) for k in keys}
                    if summary != state:
                        state = summary
                        yield f"event: state\ndata: {json.dumps(summary, ensure_ascii=False)}\n\n"
                tick += 1
                await asyncio.sleep(POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})  # fmt: skip

    # ------------------------------------------------------------------ export

    from agiasi.studio import exports

    def export_config(values: dict[str, Any]):
        """(the config as the command shows it, relative to the root; the same with absolute
        paths, for the command's own checks run here)."""
        from dataclasses import replace

        from agiasi.export.config import ExportConfig

        values = {k: v for k, v in values.items() if v not in (None, "")}
        ckpt = paths.resolve(root, str(values.get("checkpoint") or ""), what="checkpoint")
        out = paths.resolve(root, str(values.get("out") or ""), write=True, what="--out")
        values["checkpoint"], values["out"] = paths.relative(root, ckpt), paths.relative(root, out)
        absolute = {"checkpoint": str(ckpt), "out": str(out)}
        for key in ("text", "calibration"):
            if values.get(key):
                absolute[key] = paths.check_datasets(root, str(values[key]), f"--{key}")
        if values.get("imatrix") not in (None, "auto", "none"):
            absolute["imatrix"] = str(paths.resolve(root, str(values["imatrix"]), what="--imatrix"))
        if values.get("base_model"):
            absolute["base_model"] = values["base_model"] = paths.check_model(
                root, str(values["base_model"])
            )
        from agiasi.export.run import check_flags

        cfg = forms.config_from_form(ExportConfig, values, "agiasi export", ("checkpoint",))
        checked = replace(cfg, **absolute)
        check_flags(checked)  # what the flags alone get wrong, as the command says it
        return cfg, checked

    def export_command(cfg) -> dict[str, Any]:
        flags = forms.flags_of(cfg, ("checkpoint",))  # the checkpoint is the positional argument
        return {"flags": flags, "out": cfg.out,
                "command": forms.shell_line(["agiasi", "export", cfg.checkpoint, *flags])}  # fmt: skip

    @app.post("/api/export/command")
    def export_cmd(body: dict[str, Any]):
        return export_command(export_config(body.get("values") or {})[0])

    @app.post("/api/exports")
    def start_export(body: dict[str, Any]):
        cfg, absolute = export_config(body.get("values") or {})
        shown = export_command(cfg)
        pid = exports.start_export(
            root, absolute, cfg, shown["flags"], {"command": shown["command"]}
        )
        return {**shown, "pid": pid}

    @app.get("/api/gguf-types")
    def gguf_types(checkpoint: str = ""):
        """The table of GGUF types (agiasi.gguf.file_types) with each file's size estimated
        from the checkpoint's base model's parameter count (its config on the meta device)."""
        from agiasi.gguf.file_types import GGUF_TYPE_TABLE

        params = None
        if checkpoint:
            try:
                params = exports.parameter_count(paths.resolve(root, checkpoint, what="checkpoint"))
            except AgiasiError:
                params = None  # no sizes until the checkpoint is one
        rows = [{"name": t.name, "writer": t.writer, "bpw": t.bpw,
                 "needs_imatrix": t.needs_imatrix, "low_bit": t.low_bit,
                 "size_bytes": int(params * t.bytes_per_param) if params else None}
                for t in GGUF_TYPE_TABLE.values()]  # fmt: skip
        return {"parameters": params, "types": rows}

    @app.get("/api/exports")
    def list_exports():
        return {"exports": exports.find_exports(root)}

    @app.get("/api/export")
    def one_export(out: str):
        rel = paths.relative(root, paths.resolve(root, out, write=True, what="export"))
        return exports.export_state(root, rel, details=True)

    # ------------------------------------------------------------------ evaluate

    from agiasi.studio import evals

    def eval_config(values: dict[str, Any]):
        from agiasi.eval.perplexity import EvalConfig

        values = {k: v for k, v in values.items() if v not in (None, "") and k != "report"}
        if values.get("model"):
            values["model"] = paths.for_command(
                root, paths.resolve(root, str(values["model"]), what="model")
            )
        if values.get("compare"):
            values["compare"] = ",".join(
                paths.for_command(root, paths.resolve(root, m.strip(), what="--compare"))
                for m in str(values["compare"]).split(",") if m.strip()
            )  # fmt: skip
        for key in ("text", "task_data", "fewshot_data"):
            if values.get(key) and "=" not in str(values[key]):
                values[key] = str(
                    paths.resolve(root, str(values[key]), what=f"--{key.replace('_', '-')}")
                )
        if not values.get("task") and not values.get("compare"):
            raise AgiasiError(
                "choose a --task (jcommonsenseqa, jnli), or --compare two models or more for "
                "their held-out perplexity"
            )
        from agiasi.eval.tasks import parse_tasks

        cfg = forms.config_from_form(EvalConfig, values, "agiasi eval", ("model",))
        if cfg.task:
            parse_tasks(cfg.task)  # an unknown task: the command's line, before it starts
        elif cfg.model:
            raise AgiasiError("--compare names every model itself; leave out the MODEL argument")
        return cfg

    def eval_command(cfg) -> dict[str, Any]:
        flags, positional = forms.flags_of(cfg, ("model",)), forms.positionals_of(cfg, ("model",))
        return {"flags": flags, "positional": positional,
                "command": forms.shell_line(["agiasi", "eval", *positional, *flags])}  # fmt: skip

    @app.post("/api/eval/command")
    def eval_cmd(body: dict[str, Any]):
        return eval_command(eval_config(body.get("values") or {}))

    @app.post("/api/evals")
    def start_eval(body: dict[str, Any]):
        cfg = eval_config(body.get("values") or {})
        shown = eval_command(cfg)
        models = cfg.compare.split(",") if cfg.compare else [cfg.model]
        eid = evals.start_eval(root, shown["flags"], shown["positional"],
                               {"command": shown["command"], "models": models})  # fmt: skip
        return {**shown, "id": eid}

    @app.get("/api/evals")
    def list_evals():
        return {"evals": evals.find_evals(root)}

    @app.get("/api/eval")
    def one_eval(id: str):  # noqa: A002 - the query's name
        if not id.replace("-", "").isdigit():
            raise AgiasiError(f"no evaluation {id!r}")
        return evals.eval_state(root, id, details=True)

    # ------------------------------------------------------------------ chat

    from agiasi.studio.chat import DONE, ChatModels, prepare_reply, start_reply

    chat_models = ChatModels()

    @app.post("/api/chat")
    async def chat(request: Request, body: dict[str, Any]):
        import threading

        model = str(paths.resolve(root, str(body.get("model") or ""), what="model"))
        messages = list(body.get("messages") or [])
        if body.get("system"):
            messages.insert(0, {"role": "system", "content": str(body["system"])})
        params = {k: body[k] for k in ("temperature", "top_p", "max_new_tokens") if k in body}
        chat_model, ids, cfg = await asyncio.to_thread(
            prepare_reply, chat_models, model, messages, params
        )
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        start_reply(chat_model, ids, cfg, stop, chat_models.generating,
                    sink=lambda item: loop.call_soon_threadsafe(pieces.put_nowait, item))  # fmt: skip

        async def stream():
            try:
                while True:
                    try:
                        item = await asyncio.wait_for(pieces.get(), 0.5)
                    except TimeoutError:  # nothing new: is the page still there?
                        if await request.is_disconnected():
                            return
                        continue
                    if item is DONE:
                        break
                    if isinstance(item, AgiasiError):
                        yield f"event: error\ndata: {json.dumps(str(item), ensure_ascii=False)}\n\n"
                        continue
                    yield f"event: token\ndata: {json.dumps(item, ensure_ascii=False)}\n\n"
                yield "event: done\ndata: {}\n\n"
            finally:
                stop.set()  # Stop pressed, the page gone, or the end: the model's thread ends

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})  # fmt: skip

    @app.post("/api/chat/command")
    def chat_command(body: dict[str, Any]):
        """The `agiasi chat` line that answers as the page does (each model's, side by side)."""
        from agiasi.generate import GenerateConfig

        lines = []
        for m in body.get("models") or []:
            path = paths.resolve(root, str(m), what="model")
            params = {k: body[k] for k in ("temperature", "top_p", "max_new_tokens", "system")
                      if body.get(k) not in (None, "")}  # fmt: skip
            cfg = forms.config_from_form(
                GenerateConfig, {"model": paths.for_command(root, path), **params},
                "agiasi chat", ("model",),
            )  # fmt: skip
            flags = forms.flags_of(cfg, ("model",))
            lines.append(forms.shell_line(["agiasi", "chat", cfg.model, *flags]))
        return {"commands": lines}

    @app.post("/api/chat/release")
    def chat_release():
        return {"released": chat_models.release()}

    @app.get("/favicon.ico")
    def favicon():
        return Response(status_code=204)

    return app
