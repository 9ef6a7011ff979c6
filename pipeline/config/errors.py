"""The error every config problem becomes: one line naming the file and key."""


class ConfigError(ValueError):
    pass
