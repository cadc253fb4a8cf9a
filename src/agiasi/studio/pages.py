"""The studio's one page, rendered on the server in Japanese or English.

The training form is written out here from the config's schema (:mod:`agiasi.studio.forms`):
every field with its flag, help, range and choices. Everything a model or a dataset says
reaches the page later as JSON and is set with ``textContent`` by ``static/app.js``; what this
module puts into the HTML is escaped (:func:`html.escape`), and the JSON it embeds cannot close
its script element.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

# The page's words. Field help comes from the flags (English); the rest is translated.
TEXT: dict[str, tuple[str, str]] = {
    "title": ("agiasi スタジオ", "agiasi studio"),
    "tab_model": ("モデル", "Model"),
    "tab_data": ("データ", "Data"),
    "tab_train": ("学習", "Train"),
    "tab_runs": ("実行", "Runs"),
    "model_path": (
        "モデル（ローカルのフォルダまたはハブ ID）",
        "Model (a local folder or a hub id)",
    ),
    "use_shipped": ("同梱の小さな日本語モデル", "The shipped tiny Japanese model"),
    "show_info": ("調べる", "Inspect"),
    "data_path": ("データセット（ルート以下のファイル）", "Dataset (a file under the root)"),
    "use_sample": ("同梱の日本語サンプル", "The shipped Japanese sample"),
    "upload": ("アップロード", "Upload"),
    "files": ("ファイル", "Files"),
    "preview": ("プレビュー", "Preview"),
    "columns": ("列の対応（FIELD=COLUMN,…）", "Column mapping (FIELD=COLUMN,…)"),
    "format": ("形式", "Format"),
    "max_length": ("最大長", "Max length"),
    "records": ("レコード", "records"),
    "tokens": ("トークン", "tokens"),
    "cut": ("最大長で切られる例", "examples cut by the max length"),
    "roles": ("役割", "roles"),
    "example": ("最初の例（学習される部分を強調）", "First example (trained spans highlighted)"),
    "chosen": ("採用された回答", "chosen answer"),
    "rejected": ("却下された回答", "rejected answer"),
    "command": ("コマンド", "Command"),
    "yaml": ("--config 用の YAML", "YAML for --config"),
    "estimate": ("収まるか（GPU メモリの見積もり）", "Will it fit? (GPU memory estimate)"),
    "estimate_peak": ("予測ピーク（GPU 1 枚あたり）", "Predicted peak per GPU"),
    "estimate_reserved": ("PyTorch の予約分", "reserved by PyTorch"),
    "estimate_context": ("CUDA コンテキスト", "CUDA context"),
    "estimate_host": ("ホストメモリ", "host memory"),
    "estimate_gpu_here": ("この機械の GPU", "This machine's GPU"),
    "estimate_free": ("空き", "free"),
    "estimate_short": ("予測ピーク", "Predicted peak"),
    "estimate_data": (
        "データ: {tokens} トークン{approx}、最長のマイクロバッチ {batch} × {length} トークン、1 エポック ≈ {steps} ステップ（1 ステップ {per_step} トークン）",
        "Data: {tokens} tokens{approx}; the longest micro-batch {batch} × {length} tokens; one epoch ≈ {steps} steps of {per_step} tokens",
    ),
    "estimate_sampled": ("（先頭のレコードから）", " (from the first records)"),
    "estimate_no_data": (
        "データを数えられません（最大長で見積もり）: ",
        "Data not counted (estimated at the max length): ",
    ),
    "estimate_over": ("空きメモリを超える見込みです", "likely more than is free"),
    "estimate_part_weights": ("重み", "weights"),
    "estimate_part_adapter": (
        "LoRA とソウル（勾配・AdamW 状態込み）",
        "LoRA and soul (with gradients and AdamW state)",
    ),
    "estimate_part_checkpoints": (
        "チェックポイント（各層の入力）",
        "checkpoints (each layer's input)",
    ),
    "estimate_part_layer": ("1 層の再計算と逆伝播", "one layer's recompute and backward"),
    "estimate_part_head": ("ヘッドと損失", "head and loss"),
    "estimate_part_soul": ("密な回転", "dense rotation"),
    "estimate_part_workspace": ("作業領域", "workspace"),
    "estimate_part_allocator": ("アロケータの余裕", "allocator slack"),
    "copy": ("コピー", "Copy"),
    "start": ("学習を開始", "Start training"),
    "stop": ("停止", "Stop"),
    "resume": ("再開", "Resume"),
    "busy": (
        "別の実行が GPU を使っています。それでも開始しますか？",
        "Another run holds the GPU. Start anyway?",
    ),
    "group_model": ("モデル", "Model"),
    "group_data": ("データ", "Data"),
    "group_objective": ("目的関数", "Objective"),
    "group_soul": ("ソウル（回転とゲート）", "Soul (rotation and gate)"),
    "group_optimizer": ("最適化", "Optimizer"),
    "group_run": ("実行", "Run"),
    "group_advanced": ("詳細", "Advanced"),
    "default": ("既定", "default"),
    "runs": ("実行一覧", "Runs"),
    "no_runs": ("まだ実行はありません", "No runs yet"),
    "running": ("実行中", "running"),
    "starting": ("起動中", "starting"),
    "finished": ("完了", "finished"),
    "stopped": ("停止", "stopped"),
    "failed": ("失敗", "failed"),
    "unknown": ("不明", "unknown"),
    "step": ("ステップ", "step"),
    "elapsed": ("経過", "elapsed"),
    "remaining": ("残り", "remaining"),
    "best": ("最良ステップ", "best step"),
    "log": ("ログ（末尾）", "Log (last lines)"),
    "chart_loss": ("損失", "Loss"),
    "chart_lr": ("学習率", "Learning rate"),
    "chart_alpha": ("α とゲート（相）", "α and gate (phases)"),
    "chart_rotation": ("‖R − I‖ と直交誤差", "‖R − I‖ and orthogonality error"),
    "chart_speed": ("トークン/秒", "Tokens/s"),
    "chart_memory": ("ピークメモリ (GiB)", "Peak memory (GiB)"),
    "chart_rewards": ("報酬とマージン", "Rewards and margin"),
    "phases": (
        "🔵 安定  🟡 遷移中  🟢 黄金比に到達",
        "🔵 Stable  🟡 Transitioning  🟢 Golden Ratio",
    ),
    "language": ("English", "日本語"),
    "root": ("ルート", "Root"),
    "watch": ("観察", "Watch"),
    "tab_chat": ("チャット", "Chat"),
    "tab_export": ("エクスポート", "Export"),
    "tab_eval": ("評価", "Evaluate"),
    "eval_start": ("評価を開始", "Start the evaluation"),
    "evals": ("評価一覧", "Evaluations"),
    "no_evals": ("まだ評価はありません", "No evaluations yet"),
    "disagree": ("モデルの答えが分かれた問題", "Items where the models disagree"),
    "gold": ("正解", "gold"),
    "export_start": ("エクスポートを開始", "Start the export"),
    "exports": ("エクスポート一覧", "Exports"),
    "gguf_types": (
        "GGUF の型（選ぶと --gguf に入ります）",
        "GGUF types (a tick adds it to --gguf)",
    ),
    "gguf_type": ("型", "type"),
    "gguf_bpw": ("ビット/重み", "bits/weight"),
    "gguf_size": ("推定サイズ", "estimated size"),
    "gguf_writer": ("書き手", "written by"),
    "gguf_imatrix": ("重要度行列", "importance matrix"),
    "imatrix_required": ("必須", "required"),
    "imatrix_default": ("既定で使用（4 ビット以下）", "on by default (≤ 4 bits)"),
    "no_exports": ("まだエクスポートはありません", "No exports yet"),
    "report": ("忠実度レポート（CLI と同じ表）", "Fidelity report (the CLI's table)"),
    "run_it": ("動かすには", "To run it"),
    "chat_model": (
        "モデル（ステップフォルダ、HF フォルダまたは GGUF）",
        "Model (a step folder, an HF folder or a GGUF)",
    ),
    "chat_latest": ("最新の実行の最後のステップ", "The latest run's last step"),
    "chat_model_b": (
        "並べて比較するモデル（任意: 同じ入力に両方が答えます）",
        "Side by side with (optional: both answer the same message)",
    ),
    "chat_system": ("システムプロンプト", "System prompt"),
    "temperature": ("温度", "Temperature"),
    "top_p": ("top-p", "top-p"),
    "max_new_tokens": ("最大生成トークン数", "Max new tokens"),
    "send": ("送信", "Send"),
    "new_chat": ("新しい会話", "New conversation"),
    "you": ("あなた", "You"),
    "assistant": ("アシスタント", "Assistant"),
    "stopped_reply": ("（停止）", "(stopped)"),
    "loading": ("読み込み中…", "loading…"),
    "chat_placeholder": (
        "メッセージ（Enter で送信、Shift+Enter で改行）",
        "Message (Enter sends, Shift+Enter is a new line)",
    ),
}


def t(key: str, lang: str) -> str:
    ja, en = TEXT[key]
    return ja if lang == "ja" else en


def _field_html(f: dict[str, Any], lang: str, prefix: str = "f") -> str:
    name = escape(f["name"])
    label = f"<code>{escape(f['flag'])}</code>"
    default = f["default"]
    text = (
        {True: "on", False: "off"}.get(default, default) if isinstance(default, bool) else default
    )
    shown_default = (
        ""
        if default is None
        else f' <span class="default">({t("default", lang)}: {escape(str(text))})</span>'
    )
    bounds = f' <span class="bounds">[{escape(f["bounds"])}]</span>' if f["bounds"] else ""
    attrs = f'name="{name}" id="{prefix}-{name}" data-kind="{escape(f["kind"])}"'
    if f["kind"] == "bool":
        checked = " checked" if default else ""
        control = f'<input type="checkbox" {attrs}{checked}>'
    elif f["kind"] == "choice":
        opts = "".join(
            f'<option value="{escape(c)}"{" selected" if c == default else ""}>{escape(c)}</option>'
            for c in f["choices"]
        )
        control = f"<select {attrs}>{opts}</select>"
    else:
        placeholder = "" if default is None else escape(str(default))
        mode = ' inputmode="decimal"' if f["kind"] in ("int", "float") else ""
        control = (
            f'<input type="text" {attrs} placeholder="{placeholder}"{mode} autocomplete="off">'
        )
    return (
        f'<div class="field" data-field="{name}"><label for="{prefix}-{name}">{label}{shown_default}</label>'
        f'{control}<div class="help">{escape(f["help"])}{bounds}</div>'
        f'<div class="error" id="{"e" if prefix == "f" else prefix + "e"}-{name}"></div></div>'
    )


def render_page(lang: str, schema: list[dict[str, Any]], root: str,
                export_schema: list[dict[str, Any]] | None = None,
                eval_schema: list[dict[str, Any]] | None = None) -> str:  # fmt: skip
    groups = "".join(
        f'<fieldset class="group"><legend>{escape(t("group_" + g["group"], lang))}</legend>'
        + "".join(_field_html(f, lang) for f in g["fields"])
        + "</fieldset>"
        for g in schema
    )
    export_fields = "".join(
        _field_html(f, lang, "x") for g in (export_schema or []) for f in g["fields"]
    )
    eval_fields = "".join(
        _field_html(f, lang, "v") for g in (eval_schema or []) for f in g["fields"]
    )
    words = {k: t(k, lang) for k in TEXT}
    embedded = json.dumps({"lang": lang, "text": words}, ensure_ascii=False).replace("</", "<\\/")
    other = "en" if lang == "ja" else "ja"
    tabs = "".join(
        f'<button class="tab" data-tab="{k}" type="button">{escape(t("tab_" + k, lang))}</button>'
        for k in ("model", "data", "train", "runs", "export", "eval", "chat")
    )
    return f"""<!doctype html>
<html lang="{lang}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(t("title", lang))}</title>
<link rel="stylesheet" href="/static/uPlot.min.css"><link rel="stylesheet" href="/static/style.css">
</head><body>
<header><h1>{escape(t("title", lang))}</h1><nav>{tabs}</nav>
<span class="root">{escape(t("root", lang))}: <code>{escape(root)}</code></span>
<a class="lang" href="/?lang={other}">{escape(t("language", lang))}</a></header>
<main>
<section id="tab-model" class="panel">
  <label for="model">{escape(t("model_path", lang))}</label>
  <div class="row"><input type="text" id="model" autocomplete="off">
  <button type="button" id="use-shipped">{escape(t("use_shipped", lang))}</button>
  <button type="button" id="show-info">{escape(t("show_info", lang))}</button></div>
  <div class="error" id="model-error"></div><table id="model-info" class="kv"></table>
</section>
<section id="tab-data" class="panel">
  <label for="data-path">{escape(t("data_path", lang))}</label>
  <div class="row"><input type="text" id="data-path" autocomplete="off">
  <button type="button" id="use-sample">{escape(t("use_sample", lang))}</button>
  <label class="upload">{escape(t("upload", lang))}<input type="file" id="upload"></label></div>
  <div class="row"><label for="data-columns">{escape(t("columns", lang))}</label>
  <input type="text" id="data-columns" autocomplete="off">
  <label for="data-max-length">{escape(t("max_length", lang))}</label>
  <input type="text" id="data-max-length" value="512" inputmode="decimal">
  <button type="button" id="preview">{escape(t("preview", lang))}</button></div>
  <div class="error" id="data-error"></div><div id="data-summary"></div>
  <h3>{escape(t("files", lang))}</h3><ul id="files"></ul>
</section>
<section id="tab-train" class="panel">
  <form id="train-form" autocomplete="off">{groups}</form>
  <div class="error" id="form-error"></div>
  <section id="estimate" class="estimate" aria-live="polite">
  <h3>{escape(t("estimate", lang))}</h3><p id="estimate-peak"></p>
  <table id="estimate-parts" class="kv"></table><p id="estimate-notes" class="note"></p></section>
  <h3>{escape(t("yaml", lang))} <button type="button" class="copy" data-copy="yaml">{escape(t("copy", lang))}</button></h3>
  <pre id="yaml"></pre>
  <div class="actions"><pre id="command"></pre>
  <button type="button" class="copy" data-copy="command">{escape(t("copy", lang))}</button>
  <a href="#estimate" id="estimate-short" class="estimate-short"></a>
  <button type="button" id="start" class="primary">{escape(t("start", lang))}</button></div>
</section>
<section id="tab-runs" class="panel">
  <h3>{escape(t("runs", lang))}</h3><table id="runs" class="runs"></table>
  <div id="watch" hidden>
    <h3 id="watch-title"></h3>
    <div class="row"><span id="progress"></span>
    <button type="button" id="stop">{escape(t("stop", lang))}</button>
    <button type="button" id="resume">{escape(t("resume", lang))}</button></div>
    <div class="error" id="run-error"></div>
    <pre id="run-command"></pre>
    <div id="run-links" class="row"><div><h4>{escape(t("exports", lang))}</h4><ul id="run-exports"></ul></div>
    <div><h4>{escape(t("evals", lang))}</h4><ul id="run-evals"></ul></div></div>
    <div class="phases">{escape(t("phases", lang))}</div>
    <div id="charts"></div>
    <h3>{escape(t("log", lang))}</h3><pre id="log"></pre>
  </div>
</section>
<section id="tab-export" class="panel">
  <form id="export-form" autocomplete="off" class="export-form">{export_fields}</form>
  <div class="error" id="export-form-error"></div>
  <h4>{escape(t("gguf_types", lang))}</h4><table id="gguf-types" class="runs"></table>
  <div class="actions"><pre id="export-command"></pre>
  <button type="button" id="export-start" class="primary">{escape(t("export_start", lang))}</button></div>
  <h3>{escape(t("exports", lang))}</h3><table id="exports" class="runs"></table>
  <div id="export-view" hidden>
    <h3 id="export-title"></h3><div id="export-state"></div>
    <div class="error" id="export-error"></div>
    <h4>{escape(t("report", lang))}</h4><pre id="export-report"></pre>
    <h4>{escape(t("files", lang))}</h4><table id="export-files" class="kv"></table>
    <h4>{escape(t("run_it", lang))}</h4><pre id="export-run"></pre>
    <h4>Modelfile</h4><pre id="export-modelfile"></pre>
    <h4>{escape(t("log", lang))}</h4><pre id="export-log"></pre>
  </div>
</section>
<section id="tab-eval" class="panel">
  <form id="eval-form" autocomplete="off" class="export-form">{eval_fields}</form>
  <div class="error" id="eval-form-error"></div>
  <div class="actions"><pre id="eval-command"></pre>
  <button type="button" id="eval-start" class="primary">{escape(t("eval_start", lang))}</button></div>
  <h3>{escape(t("evals", lang))}</h3><table id="evals" class="runs"></table>
  <div id="eval-view" hidden>
    <h3 id="eval-title"></h3><div id="eval-state"></div><div class="error" id="eval-error"></div>
    <pre id="eval-table"></pre>
    <h4>{escape(t("disagree", lang))}</h4><table id="eval-disagree" class="runs"></table>
    <h4>{escape(t("log", lang))}</h4><pre id="eval-log"></pre>
  </div>
</section>
<section id="tab-chat" class="panel">
  <label for="chat-model">{escape(t("chat_model", lang))}</label>
  <div class="row"><input type="text" id="chat-model" autocomplete="off">
  <button type="button" id="chat-latest">{escape(t("chat_latest", lang))}</button></div>
  <label for="chat-model-b">{escape(t("chat_model_b", lang))}</label>
  <div class="row"><input type="text" id="chat-model-b" autocomplete="off"></div>
  <div class="row"><label for="chat-system">{escape(t("chat_system", lang))}</label>
  <input type="text" id="chat-system" autocomplete="off">
  <label for="chat-temperature">{escape(t("temperature", lang))}</label>
  <input type="text" id="chat-temperature" value="0" inputmode="decimal" class="short">
  <label for="chat-top-p">{escape(t("top_p", lang))}</label>
  <input type="text" id="chat-top-p" value="0.9" inputmode="decimal" class="short">
  <label for="chat-max">{escape(t("max_new_tokens", lang))}</label>
  <input type="text" id="chat-max" value="128" inputmode="decimal" class="short"></div>
  <pre id="chat-command"></pre>
  <div id="chat-log"></div>
  <textarea id="chat-input" rows="3" placeholder="{escape(t("chat_placeholder", lang))}"></textarea>
  <div class="row"><button type="button" id="chat-send" class="primary">{escape(t("send", lang))}</button>
  <button type="button" id="chat-stop" disabled>{escape(t("stop", lang))}</button>
  <button type="button" id="chat-new">{escape(t("new_chat", lang))}</button></div>
  <div class="error" id="chat-error"></div>
</section>
</main>
<script id="i18n" type="application/json">{embedded}</script>
<script src="/static/uPlot.iife.min.js"></script><script src="/static/app.js"></script>
</body></html>"""
