"""The old home of the PostgreSQL backend's SQL, kept for the one name users import from it:
`least_privilege_grants` (see eventcore.stores.postgres; the SQL is in stores/postgres/sql/)."""
from .postgres import least_privilege_grants

__all__ = ["least_privilege_grants"]
