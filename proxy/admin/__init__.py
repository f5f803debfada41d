"""The admin console: `psql -h HOST -p 6432 -U <admin user> pgsage`, served by the proxy itself."""

from .console import AdminConsole, AdminContext

__all__ = ["AdminConsole", "AdminContext"]
