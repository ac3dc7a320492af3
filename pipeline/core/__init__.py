"""The ground floor: error types, atomic io and digests, progress lines, typed configuration and
model specs (one per architecture), the codec table, and the process settings a host may opt
into. Imports nothing else of pipeline."""

__version__ = "0.1.0"
