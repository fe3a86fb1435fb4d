"""Name -> class registries (aggregation rules, policies, client algorithms): one decorator factory."""


def registrar(table: dict, names: tuple[str, ...] | None = None):
    """`register = registrar(TABLE)`; `@register("name")` sets `cls.name` and `TABLE["name"] = cls`.
    With `names` (a name table of `choices`, which config validation reads without importing the
    implementations), a name missing from it is refused at import."""
    def register(name: str):
        if names is not None and name not in names:
            raise RuntimeError(f"{name!r} is registered but not named in its choices table {names}")

        def add(cls):
            cls.name = name
            table[name] = cls
            return cls
        return add
    return register
