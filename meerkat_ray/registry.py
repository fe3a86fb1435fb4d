"""Name -> class registries (aggregation rules, policies, client algorithms): one decorator factory."""


def registrar(table: dict):
    """`register = registrar(TABLE)`; `@register("name")` sets `cls.name` and `TABLE["name"] = cls`."""
    def register(name: str):
        def add(cls):
            cls.name = name
            table[name] = cls
            return cls
        return add
    return register
