"""Builds the module graph, constructs providers and controllers, and runs their lifecycle hooks.

Scoping follows Nest: a class sees the providers of its own module, the exports of the modules
that module imports, and global modules.  Every wiring mistake is found while building, before
anything listens, naming the class and the parameter that could not be satisfied.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Iterator
from typing import Annotated, Any, get_args, get_origin

from .decorators import MODULE_ATTR, DynamicModule, Inject
from .exceptions import WiringError


def token_name(token: Any) -> str:
    return token.__name__ if isinstance(token, type) else repr(token)


def _token(provider: Any, module_name: str) -> Any:
    if isinstance(provider, type):
        return provider
    if isinstance(provider, dict) and "provide" in provider:
        if {"use_value", "use_class", "use_factory"} & provider.keys():
            return provider["provide"]
    raise WiringError(
        f"{module_name}: provider {provider!r} is neither a class nor a dict with 'provide' and "
        "one of 'use_value', 'use_class', 'use_factory'"
    )


class ModuleRef:
    def __init__(self, key: Any, cls: type, metas: list[DynamicModule]) -> None:
        self.key = key
        self.cls = cls
        self.name = cls.__name__
        self.is_global = any(meta.is_global for meta in metas)
        self.providers = {_token(p, self.name): p for meta in metas for p in meta.providers}
        self.controllers = [c for meta in metas for c in meta.controllers]
        self.exports = [e for meta in metas for e in meta.exports]
        self.imports: list[ModuleRef] = []
        self.exported: dict[Any, ModuleRef] = {}  # token -> the module that provides it
        self.instances: dict[Any, Any] = {}

    def exported_tokens(self, seen: set[int]) -> Iterator[tuple[Any, ModuleRef]]:
        """Tokens this module shares, with the module that provides each; exporting an imported
        module shares what that module exports.  ``seen``: modules already walked."""
        if id(self) in seen:
            return
        seen.add(id(self))
        for token in self.exports:
            imported = next((m for m in self.imports if token in (m.key, m.cls)), None)
            if imported is not None:
                yield from imported.exported_tokens(seen)
            elif token in self.providers:
                yield token, self
            else:
                raise WiringError(
                    f"{self.name} exports {token_name(token)}, which is neither one of its "
                    "providers nor a module it imports"
                )


class Container:
    """Resolves tokens module by module and keeps one instance per provider."""

    def __init__(self, root: Any) -> None:
        self.modules: list[ModuleRef] = []
        self._add_module(root, None)
        self._globals = [m for m in self.modules if m.is_global]
        self.controllers: list[Any] = []
        self._resolving: list[str] = []
        for mod in self.modules:
            mod.exported = dict(mod.exported_tokens(set()))

    def _add_module(self, spec: Any, importer: str | None) -> ModuleRef:
        known = next((m for m in self.modules if m.key is spec), None)
        if known is not None:
            return known
        cls = spec.module if isinstance(spec, DynamicModule) else spec
        # A dynamic module adds to the metadata of its class, if it has any.
        metas = [m for m in (getattr(cls, MODULE_ATTR, None), spec) if isinstance(m, DynamicModule)]
        if not metas:
            where = f" (imported by {importer})" if importer else ""
            name = getattr(spec, "__name__", repr(spec))
            raise WiringError(f"{name}{where} is not a module: decorate it with @Module(...)")
        ref = ModuleRef(spec, cls, metas)
        self.modules.append(ref)
        ref.imports = [self._add_module(imp, ref.name) for meta in metas for imp in meta.imports]
        return ref

    def _find(self, token: Any, mod: ModuleRef) -> ModuleRef | None:
        if token in mod.providers:
            return mod
        scopes = (*mod.imports, *self._globals)
        return next((scope.exported[token] for scope in scopes if token in scope.exported), None)

    async def resolve(self, token: Any, mod: ModuleRef, wanted_by: str = "") -> Any:
        owner = self._find(token, mod)
        if owner is None:
            who = f"{wanted_by} needs " if wanted_by else ""
            raise WiringError(
                f"{who}{token_name(token)}, but no provider for it is visible in {mod.name}: "
                f"add it to {mod.name}'s providers, or import a module that exports it"
            )
        if token not in owner.instances:
            label = f"{token_name(token)} in {owner.name}"
            if label in self._resolving:
                cycle = " -> ".join([*self._resolving[self._resolving.index(label) :], label])
                raise WiringError(f"circular dependency: {cycle}")
            self._resolving.append(label)
            try:
                owner.instances[token] = await self._build(owner.providers[token], owner)
            finally:
                self._resolving.pop()
        return owner.instances[token]

    async def _build(self, provider: Any, mod: ModuleRef) -> Any:
        if isinstance(provider, type):
            return await self.construct(provider, mod)
        if "use_value" in provider:
            return provider["use_value"]
        if "use_class" in provider:
            return await self.construct(provider["use_class"], mod)
        wanted_by = f"factory for {token_name(provider['provide'])}"
        args = [await self.resolve(t, mod, wanted_by) for t in provider.get("inject", ())]
        result = provider["use_factory"](*args)
        return await result if inspect.isawaitable(result) else result

    async def construct(self, cls: type, mod: ModuleRef) -> Any:
        """``cls``, each constructor parameter injected by its type hint or its ``Inject`` token;
        a parameter with a default keeps it when nothing visible provides the token."""
        try:
            hints = typing.get_type_hints(cls.__init__, include_extras=True)
        except NameError as exc:
            raise WiringError(f"{cls.__name__}: cannot read constructor type hints: {exc}") from exc
        kwargs = {}
        for name, param in list(inspect.signature(cls.__init__).parameters.items())[1:]:
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            hint = hints.get(name, param.empty)
            base, *extras = get_args(hint) if get_origin(hint) is Annotated else (hint,)
            injects = [extra.token for extra in extras if isinstance(extra, Inject)]
            token = injects[-1] if injects else base
            if param.default is not param.empty:
                if token is param.empty or self._find(token, mod) is None:
                    continue
            elif token is param.empty:
                raise WiringError(
                    f"{cls.__name__}: constructor parameter {name!r} has no type hint, so nothing "
                    "can be injected; annotate it with a provider class or "
                    "Annotated[T, Inject(token)]"
                )
            kwargs[name] = await self.resolve(token, mod, f"{cls.__name__} (parameter {name!r})")
        return cls(**kwargs)

    async def init(self) -> Container:
        """Construct every provider and controller, eager so that mistakes surface now, then
        run ``on_module_init``."""
        for mod in self.modules:
            for token in mod.providers:
                await self.resolve(token, mod)
        for mod in self.modules:
            for ctrl in mod.controllers:
                self.controllers.append(await self.construct(ctrl, mod))
        await self.call_hooks("on_module_init")
        return self

    async def call_hooks(self, *names: str) -> None:
        providers = [instance for mod in self.modules for instance in mod.instances.values()]
        for name in names:
            for instance in [*providers, *self.controllers]:
                result = getattr(instance, name, lambda: None)()
                if inspect.isawaitable(result):
                    await result

    def get(self, token: Any) -> Any:
        for mod in self.modules:
            if token in mod.instances:
                return mod.instances[token]
        for ctrl in self.controllers:
            if type(ctrl) is token:
                return ctrl
        raise KeyError(f"no instance of {token_name(token)} in the application")
