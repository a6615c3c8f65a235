"""Builds the module graph and constructs providers and controllers.

Scoping follows Nest: a class sees the providers of its own module, the
exports of the modules that module imports, and global modules.  Every wiring
mistake is found while building, before anything listens, and the error names
the class and the parameter that could not be satisfied.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, get_args, get_origin

from .decorators import MODULE_ATTR, DynamicModule, Inject, ModuleMeta
from .exceptions import WiringError

_MISSING = object()


@dataclass
class _ProviderDef:
    token: Any
    kind: str  # "class" | "value" | "factory"
    target: Any
    inject: tuple[Any, ...] = ()


def token_name(token: Any) -> str:
    return token.__name__ if isinstance(token, type) else repr(token)


def _provider_def(spec: Any, module_name: str) -> _ProviderDef:
    if isinstance(spec, type):
        return _ProviderDef(spec, "class", spec)
    if isinstance(spec, dict) and "provide" in spec:
        token = spec["provide"]
        if "use_value" in spec:
            return _ProviderDef(token, "value", spec["use_value"])
        if "use_class" in spec:
            return _ProviderDef(token, "class", spec["use_class"])
        if "use_factory" in spec:
            return _ProviderDef(
                token, "factory", spec["use_factory"], tuple(spec.get("inject", ()))
            )
    raise WiringError(
        f"{module_name}: provider {spec!r} is neither a class nor a dict with 'provide' and one "
        "of 'use_value', 'use_class', 'use_factory'"
    )


def constructor_dependencies(cls: type) -> list[tuple[str, Any, Any]]:
    """``(parameter, token, default)`` for each constructor parameter of ``cls``."""
    init = cls.__init__
    if init is object.__init__:
        return []
    try:
        hints = typing.get_type_hints(init, include_extras=True)
    except NameError as exc:
        raise WiringError(f"{cls.__name__}: cannot read constructor type hints: {exc}") from exc
    deps = []
    for name, param in list(inspect.signature(init).parameters.items())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        hint = hints.get(name, _MISSING)
        token: Any = hint
        if get_origin(hint) is Annotated:
            base, *extras = get_args(hint)
            token = base
            for extra in extras:
                if isinstance(extra, Inject):
                    token = extra.token
        if token is _MISSING:
            if param.default is not param.empty:
                continue
            raise WiringError(
                f"{cls.__name__}: constructor parameter {name!r} has no type hint, so nothing "
                "can be injected; annotate it with a provider class or Annotated[T, Inject(token)]"
            )
        default = _MISSING if param.default is param.empty else param.default
        deps.append((name, token, default))
    return deps


class ModuleRef:
    """One module in the graph: its providers, what it imports, what it shares."""

    def __init__(self, key: Any, meta: ModuleMeta | DynamicModule, name: str) -> None:
        self.key = key
        self.name = name
        self.is_global = meta.is_global
        self.providers: dict[Any, _ProviderDef] = {}
        for spec in meta.providers:
            pdef = _provider_def(spec, name)
            self.providers[pdef.token] = pdef
        self.controllers = list(meta.controllers)
        self.raw_imports = list(meta.imports)
        self.raw_exports = list(meta.exports)
        self.imports: list[ModuleRef] = []
        self.instances: dict[Any, Any] = {}

    def exported_tokens(self, seen: set[int] | None = None) -> Iterator[tuple[Any, ModuleRef]]:
        """Tokens this module shares, with the module that owns each one."""
        seen = seen if seen is not None else set()
        if id(self) in seen:
            return
        seen.add(id(self))
        for exp in self.raw_exports:
            mod = next(
                (m for m in self.imports if exp in (m.key, getattr(m.key, "module", None))), None
            )
            if mod is not None:
                yield from mod.exported_tokens(seen)
            else:
                yield exp, self


class Container:
    """Resolves tokens module by module and keeps one instance per provider."""

    def __init__(self, root: Any) -> None:
        self.modules: list[ModuleRef] = []
        self._by_key: dict[int, ModuleRef] = {}
        self.root = self._add_module(root, [])
        self._globals = [m for m in self.modules if m.is_global]
        self.controllers: list[Any] = []
        self._resolving: list[str] = []
        self._check_exports()

    def _add_module(self, spec: Any, path: list[str]) -> ModuleRef:
        if isinstance(spec, DynamicModule):
            meta: ModuleMeta | DynamicModule = spec
            base = getattr(spec.module, MODULE_ATTR, None)
            name = spec.module.__name__
            if base is not None:  # a dynamic module adds to its class's own metadata
                meta = DynamicModule(
                    spec.module,
                    [*base.imports, *spec.imports],
                    [*base.controllers, *spec.controllers],
                    [*base.providers, *spec.providers],
                    [*base.exports, *spec.exports],
                    base.is_global or spec.is_global,
                )
        else:
            meta = getattr(spec, MODULE_ATTR, None)
            name = getattr(spec, "__name__", repr(spec))
            if meta is None:
                where = f" (imported by {path[-1]})" if path else ""
                raise WiringError(f"{name}{where} is not a module: decorate it with @Module(...)")
        if id(spec) in self._by_key:
            return self._by_key[id(spec)]
        ref = ModuleRef(spec, meta, name)
        self._by_key[id(spec)] = ref
        self.modules.append(ref)
        for imp in ref.raw_imports:
            ref.imports.append(self._add_module(imp, [*path, name]))
        return ref

    def _check_exports(self) -> None:
        for mod in self.modules:
            for token, owner in mod.exported_tokens():
                if owner is mod and token not in mod.providers:
                    raise WiringError(
                        f"{mod.name} exports {token_name(token)}, which is neither one of its "
                        "providers nor a module it imports"
                    )

    def _find(self, token: Any, mod: ModuleRef) -> ModuleRef | None:
        if token in mod.providers:
            return mod
        for scope in (*mod.imports, *self._globals):
            for exported, owner in scope.exported_tokens():
                if exported == token:
                    return owner
        return None

    async def resolve(self, token: Any, mod: ModuleRef, wanted_by: str = "") -> Any:
        owner = self._find(token, mod)
        if owner is None:
            who = f"{wanted_by} needs " if wanted_by else ""
            raise WiringError(
                f"{who}{token_name(token)}, but no provider for it is visible in {mod.name}: "
                f"add it to {mod.name}'s providers, or import a module that exports it"
            )
        if token in owner.instances:
            return owner.instances[token]
        label = f"{token_name(token)} in {owner.name}"
        if label in self._resolving:
            cycle = " -> ".join([*self._resolving[self._resolving.index(label) :], label])
            raise WiringError(f"circular dependency: {cycle}")
        self._resolving.append(label)
        try:
            instance = await self._build(owner.providers[token], owner)
        finally:
            self._resolving.pop()
        owner.instances[token] = instance
        return instance

    async def _build(self, pdef: _ProviderDef, mod: ModuleRef) -> Any:
        if pdef.kind == "value":
            return pdef.target
        if pdef.kind == "factory":
            args = [
                await self.resolve(t, mod, f"factory for {token_name(pdef.token)}")
                for t in pdef.inject
            ]
            result = pdef.target(*args)
            return await result if inspect.isawaitable(result) else result
        return await self.construct(pdef.target, mod)

    async def construct(self, cls: type, mod: ModuleRef) -> Any:
        kwargs = {}
        for name, token, default in constructor_dependencies(cls):
            if default is not _MISSING and self._find(token, mod) is None:
                continue
            kwargs[name] = await self.resolve(token, mod, f"{cls.__name__} (parameter {name!r})")
        return cls(**kwargs)

    async def init(self) -> None:
        """Construct every provider and controller; eager, so mistakes surface now."""
        for mod in self.modules:
            for token in mod.providers:
                await self.resolve(token, mod)
        for mod in self.modules:
            for ctrl in mod.controllers:
                self.controllers.append(await self.construct(ctrl, mod))

    def instances(self) -> Iterable[Any]:
        for mod in self.modules:
            yield from mod.instances.values()
        yield from self.controllers

    def get(self, token: Any) -> Any:
        for mod in self.modules:
            if token in mod.instances:
                return mod.instances[token]
        for ctrl in self.controllers:
            if type(ctrl) is token:
                return ctrl
        raise KeyError(f"no instance of {token_name(token)} in the application")
