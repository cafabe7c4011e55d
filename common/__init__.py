"""The foundation: files, processes and pools, run locks, exit records, the usage error. Imports nothing
from the rest of the project (docs/design.md "Code layout")."""
