"""The web workbench (``agiasi studio``): a page over the same configs and stage functions the
CLI uses — ``entry`` (the command), ``server`` (the app and its API), ``pages`` (the page),
``forms`` (a form from a config), ``runs`` (runs found, started, stopped), ``exports`` and ``evals`` (the same for exports and evaluations), ``paths`` (what it may
touch), ``chat`` (the page's chat), ``static/`` (the script, the style, uPlot vendored).
"""

from agiasi._lazy import lazy_exports, lazy_names

_EXPORTS = lazy_names(
    """
    chat: ChatModels prepare_reply start_reply
    entry: StudioConfig studio
    evals: eval_state find_evals start_eval
    exports: export_state find_exports start_export
    forms: config_from_form flags_of form_schema yaml_of
    runs: find_runs run_state start_run stop_run
    server: create_app
    """
)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
