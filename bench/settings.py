"""Production settings (jobsite.settings), with plain static file storage.

The hashed-name storage needs `collectstatic`, which fails on the vendored Chart.js
(it names a source map, chart.umd.min.js.map, that is not vendored). Static file
names cost nothing measurable in a page, so the benchmarks use unhashed ones.
"""

from jobsite.settings import *  # noqa: F403

STORAGES = {
    **STORAGES,  # noqa: F405
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
