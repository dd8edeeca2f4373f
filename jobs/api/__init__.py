"""The JSON API (Django REST framework): thin views over selectors and services."""
