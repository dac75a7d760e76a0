"""The errors services raise (defined in the store layer, re-exported here so the API needs only services)."""
from loralab.store.errors import Conflict, IllegalTransition, Invalid, LoralabError, NotFound, TooLarge

__all__ = ["Conflict", "IllegalTransition", "Invalid", "LoralabError", "NotFound", "TooLarge"]
