from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from jobs.web import views

urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("", include("jobs.urls")),
]
