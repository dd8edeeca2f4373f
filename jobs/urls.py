from django.urls import path

from jobs import views

urlpatterns = [
    path("", views.history, name="jobs-history"),
    path("submit/", views.submit_list, name="jobs-submit-list"),
    path("submit/<slug:name>/", views.submit, name="jobs-submit"),
    path("runs/<str:job_id>/", views.detail, name="jobs-detail"),
    path("runs/<str:job_id>/file", views.download, name="jobs-download"),
]
