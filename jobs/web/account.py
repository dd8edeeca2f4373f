"""The user's own page for API tokens: list, create (the secret shown once), revoke."""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods, require_POST

from jobs import selectors, services


class TokenCreateForm(forms.Form):
    name = forms.CharField(
        label="Name",
        max_length=100,
        help_text="What the token is for, e.g. “nightly import script”.",
    )


@never_cache  # the response that shows a new secret must not be kept anywhere
@require_http_methods(["GET", "POST"])
def tokens(request: HttpRequest) -> HttpResponse:
    form = TokenCreateForm(request.POST if request.method == "POST" else None)
    context: dict = {"form": form}
    status = 200
    if request.method == "POST":
        if form.is_valid():
            token, secret = services.api_token_create(
                user=request.user, name=form.cleaned_data["name"]
            )
            # Rendered in this response only: the secret is never stored or redirected with.
            context.update(form=TokenCreateForm(), new_token=token, new_secret=secret)
        else:
            status = 400
    context["tokens"] = selectors.api_token_list(user=request.user)
    return render(request, "jobs/account_tokens.html", context, status=status)


@require_POST
def token_revoke(request: HttpRequest, token_id: int) -> HttpResponse:
    token = selectors.api_token_get(user=request.user, token_id=token_id)
    try:
        services.api_token_revoke(token=token, user=request.user)
    except services.ActionError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Revoked “{token.name}”: it no longer works.")
    return redirect("account-tokens")
