"""Interpreter-start hook: registers the plugin with lm-eval, lazily.

Installed by ``lm_eval_needles.pth`` (and the PEP 829 ``lm_eval_needles.start`` file). The
``.pth`` line defines a tiny finder inline, so interpreter start imports nothing of ours; only
when a program imports one of the lm-eval modules below is this module imported, and the
matching patch in ``harness_ext.plugin.registration`` runs right after that module has loaded.
Keep the module names here in sync with the ``.pth`` line.
"""

import sys

# module name -> name of the function in harness_ext.plugin.registration that patches it
_HOOKS = {
    "lm_eval.tasks.manager": "patch_task_manager",
    "lm_eval.models.vllm_causallms": "patch_generation",
    "lm_eval.models.huggingface": "patch_generation",
}


def _run_hook(name, module):
    from harness_ext.plugin import registration

    getattr(registration, _HOOKS[name])(module)


class _Loader:
    """Delegates to the real loader and runs the hook after the module executes."""

    def __init__(self, loader, name):
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _run_hook(self._name, module)

    def __getattr__(self, attr):
        return getattr(self._loader, attr)


_FINDER_NAME = "_NeedlesLazyFinder"


def claim(name, path=None, target=None):
    """Find ``name`` with the other finders and wrap its loader so the hook runs after it."""
    if name not in _HOOKS:
        return None
    for finder in sys.meta_path:
        if type(finder).__name__ == _FINDER_NAME or not hasattr(finder, "find_spec"):
            continue
        spec = finder.find_spec(name, path, target)
        if spec is not None:
            if spec.loader is not None and not isinstance(spec.loader, _Loader):
                spec.loader = _Loader(spec.loader, name)
            return spec
    return None


class _NeedlesLazyFinder:
    find_spec = staticmethod(claim)


def install():
    """Idempotent: one finder, and modules imported before us are patched at once."""
    if not any(type(f).__name__ == _FINDER_NAME for f in sys.meta_path):
        sys.meta_path.insert(0, _NeedlesLazyFinder())
    for name in _HOOKS:
        if name in sys.modules:
            _run_hook(name, sys.modules[name])
