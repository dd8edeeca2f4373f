"""The browser pages: thin views over jobs.selectors (reads) and jobs.services (writes)."""
