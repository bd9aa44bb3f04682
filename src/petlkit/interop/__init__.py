"""Moving trained adapters between petlkit and other libraries."""
