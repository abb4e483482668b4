"""Family mapper: being written."""
