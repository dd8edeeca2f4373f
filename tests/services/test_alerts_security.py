"""Alerts: webhooks never reach internal addresses; a bad subject never silences e-mail."""

from __future__ import annotations

import socket
import threading
import uuid
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from jobs import redis
from jobs.models import Alert, AlertRule, Job
from jobs.services import alerts
from jobs.services.alerts import alerts_check


@pytest.fixture(autouse=True)
def _fresh_marks():
    """The failure mark, open incidents and the lock live in Redis, beyond the test DB."""
    client = redis.client()
    keys = [*client.scan_iter("jobsite:alerts:*")]
    if keys:
        client.delete(*keys)


def failed_run(job_type, *, message="disk full", seconds_ago=5) -> Job:
    now = timezone.now()
    return Job.objects.create(
        id=str(uuid.uuid4()),
        job_type=job_type,
        task_name=job_type.task_name,
        state="FAILURE",
        created_at=now - timedelta(seconds=seconds_ago + 1),
        started_at=now - timedelta(seconds=seconds_ago + 0.5),
        finished_at=now - timedelta(seconds=seconds_ago),
        exception_type="SimulatedFailure",
        error_message=message,
    )


def email_rule(job_type, **fields) -> AlertRule:
    defaults = {"name": "Mail", "job_type": job_type, "emails": "ops@example.com"}
    return AlertRule.objects.create(**{**defaults, "min_interval": 3600, **fields})


# --- E-mail subjects and folding (item 6) ------------------------------------------------


def test_an_error_with_newlines_still_sends_the_mail_with_a_one_line_subject(job_types, mailoutbox):
    email_rule(job_types["flaky"])
    failed_run(job_types["flaky"], message="line one\r\nBcc: victim@example.com\nline three")

    alerts_check()

    alert = Alert.objects.get()
    assert alert.email_sent and alert.error == ""
    assert len(mailoutbox) == 1
    subject = mailoutbox[0].subject
    assert "\n" not in subject and "\r" not in subject
    assert "line one Bcc: victim@example.com line three" in subject
    assert mailoutbox[0].bcc == []


def test_a_long_subject_is_capped(job_types, mailoutbox):
    email_rule(job_types["flaky"])
    failed_run(job_types["flaky"], message="x" * 5000)

    alerts_check()

    assert len(mailoutbox[0].subject) <= 300
    assert len(Alert.objects.get().subject) <= 300


def test_alerts_are_never_folded_into_one_that_was_not_delivered(job_types, mailoutbox, settings):
    rule = email_rule(job_types["flaky"])
    # A real SMTP connection to a port nobody listens on: the first mail fails.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = "127.0.0.1", closed_port, 2
    failed_run(job_types["flaky"], seconds_ago=20)
    alerts_check()
    undelivered = Alert.objects.get()
    assert not undelivered.email_sent and undelivered.error.startswith("e-mail:")

    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    failed_run(job_types["flaky"], seconds_ago=10)
    alerts_check()

    alerts = list(rule.alerts.order_by("created_at", "id"))
    assert len(alerts) == 2  # not folded into the one nobody received
    assert alerts[1].email_sent and len(mailoutbox) == 1
    assert alerts[1].payload["previous_undelivered"] == undelivered.pk
    assert "was not delivered" in mailoutbox[0].body

    failed_run(job_types["flaky"], seconds_ago=5)
    alerts_check()  # the last one was delivered: this one folds into it, as before

    assert rule.alerts.count() == 2 and len(mailoutbox) == 1
    assert rule.alerts.order_by("-created_at", "-id").first().suppressed == 1


# --- Webhooks: no server-side request forgery (item 3) -----------------------------------


class Server:
    """A real HTTP server on 127.0.0.1 that records requests and answers as told."""

    def __init__(self, status: int = 200, location: str = "", answer: bool = True) -> None:
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                server.requests.append(self.path)
                if not answer:
                    self.close_connection = True
                    return  # accepted, then closed without a word
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.end_headers()

            def do_GET(self) -> None:  # where urllib would follow a 302 to
                server.requests.append(self.path)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers():
    made: list[Server] = []

    def make(**kwargs) -> Server:
        made.append(Server(**kwargs))
        return made[-1]

    yield make
    for server in made:
        server.close()


@pytest.fixture
def connects(monkeypatch):
    """Every address this process tries to connect to; 169.254.169.254 is never reached."""
    seen: list[str] = []
    connect = socket.socket.connect

    def spy(sock, address):
        seen.append(address[0])
        if address[0] == "169.254.169.254":
            raise AssertionError("tried to connect to the metadata address")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", spy)
    return seen


def webhook_rule(job_type, url: str) -> AlertRule:
    # Stored without validation, as a rule saved before the check (or a host whose
    # DNS answer changed since) would be: the send must check again.
    return AlertRule.objects.create(
        name="Hook", job_type=job_type, emails="", webhook_url=url, min_interval=0
    )


def send(job_type, url: str) -> Alert:
    webhook_rule(job_type, url)
    failed_run(job_type)
    alerts_check()
    return Alert.objects.get()


@pytest.fixture
def quick(settings):
    settings.JOBSITE_ALERT_WEBHOOK_ATTEMPTS = 1
    settings.JOBSITE_ALERT_WEBHOOK_TIMEOUT = 1
    return settings


def test_a_webhook_on_loopback_is_refused_without_a_request(job_types, servers, quick):
    server = servers()

    alert = send(job_types["flaky"], server.url)

    assert server.requests == []
    assert alert.webhook_status == "refused"
    assert "127.0.0.1" in alert.error and "loopback" in alert.error


def test_a_host_in_the_allow_list_is_sent_to(job_types, servers, quick):
    quick.JOBSITE_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    server = servers()

    alert = send(job_types["flaky"], server.url)

    assert server.requests == ["/hook"]
    assert alert.webhook_status == "200" and alert.error == ""


def test_the_metadata_address_is_refused_before_any_connection(job_types, quick, connects):
    alert = send(job_types["flaky"], "http://169.254.169.254/latest/meta-data/")

    assert "169.254.169.254" not in connects
    assert alert.webhook_status == "refused" and "link-local" in alert.error


def test_a_name_resolving_to_loopback_is_refused_at_send_time(job_types, servers, quick):
    server = servers()
    url = server.url.replace("127.0.0.1", "localhost")

    alert = send(job_types["flaky"], url)

    assert server.requests == []
    assert alert.webhook_status == "refused" and "loopback" in alert.error


def test_a_redirect_is_not_followed(job_types, servers, quick):
    quick.JOBSITE_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    elsewhere = servers()
    redirecting = servers(status=302, location=elsewhere.url)

    alert = send(job_types["flaky"], redirecting.url)

    assert redirecting.requests == ["/hook"] and elsewhere.requests == []
    assert alert.webhook_status == "302"
    assert "redirect refused" in alert.error


def test_connection_faults_are_recorded_alike_so_staff_cannot_scan_ports(job_types, servers, quick):
    quick.JOBSITE_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/hook"
    silent = socket.socket()  # listens, never accepts: the request times out
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    timing_out = f"http://127.0.0.1:{silent.getsockname()[1]}/hook"
    hanging_up = servers(answer=False).url

    recorded = []
    for url in (closed, timing_out, hanging_up):
        for model in (Alert, AlertRule, Job):
            model.objects.all().delete()
        alert = send(job_types["flaky"], url)
        recorded.append((alert.webhook_status, alert.error))
        redis.client().delete(alerts.MARK_KEY)
    silent.close()

    assert recorded[0] == recorded[1] == recorded[2]
    assert recorded[0] == ("unreachable after 1 attempts", f"webhook: {alerts.UNREACHABLE}")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:8000/hook", "loopback"),
        ("http://localhost/hook", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[fe80::1]/hook", "link-local"),
        ("http://10.1.2.3/hook", "private"),
        ("http://192.168.0.10/hook", "private"),
        ("http://[::ffff:127.0.0.1]/hook", "loopback"),
        ("http://224.0.0.1/hook", "multicast"),
        ("http://0.0.0.0/hook", "unspecified"),
        ("http://240.0.0.1/hook", "reserved"),
        ("ftp://example.com/hook", "http"),
        ("http://nowhere.invalid/hook", "does not resolve"),
    ],
)
def test_a_rule_pointing_at_an_internal_address_is_refused_at_save(job_types, url, message):
    rule = AlertRule(name="Hook", job_type=job_types["flaky"], webhook_url=url)

    with pytest.raises(ValidationError) as refused:
        rule.full_clean()

    assert message in " ".join(refused.value.message_dict["webhook_url"])


def test_an_allowed_host_may_be_saved(job_types, settings):
    settings.JOBSITE_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1", "10.0.0.0/8"]
    for url in ("http://127.0.0.1:9000/hook", "http://10.20.30.40/hook"):
        AlertRule(name="Hook", job_type=job_types["flaky"], webhook_url=url).full_clean()


def test_the_admin_form_shows_the_refusal_and_saves_nothing(admin_client, job_types):
    response = admin_client.post(
        "/admin/jobs/alertrule/add/",
        {
            "name": "Metadata",
            "enabled": "on",
            "on_failure": "on",
            "emails": "",
            "webhook_url": "http://169.254.169.254/latest/meta-data/",
            "webhook_secret": "",
            "min_interval": "300",
        },
    )

    assert response.status_code == 200
    assert "link-local" in response.content.decode()
    assert not AlertRule.objects.exists()
