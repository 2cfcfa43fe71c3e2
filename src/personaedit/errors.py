"""Exceptions a user can cause. The CLI prints them as one line and exits with status 2."""


class PersonaEditError(Exception):
    """Base class for errors caused by input: a missing model, a bad spec, an incompatible edit."""


class ModelNotFoundError(PersonaEditError):
    """A model spec that names nothing loadable on this machine."""


class UnsupportedArchitectureError(PersonaEditError):
    """A model whose layer layout personaedit does not know."""


class PersonaSpecError(PersonaEditError):
    """An unknown trait, pole or level in a persona spec."""


class EditError(PersonaEditError):
    """An edit that cannot be loaded or does not fit the model it is applied to."""


class InputFileError(PersonaEditError):
    """A missing or malformed input file."""
