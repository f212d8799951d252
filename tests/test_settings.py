import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.nodb


def load_settings(**env):
    base = {k: v for k, v in os.environ.items() if k not in {"SECRET_KEY", "DEBUG", "DATABASE_URL"}}
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import controlplane.settings.base as s; print(s.DATABASES['default']['ENGINE'])",
        ],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_production_refuses_to_start_without_a_secret_key(tmp_path):
    result = load_settings(DEBUG="false", SIROCCO_VAR_DIR=str(tmp_path))
    assert result.returncode != 0
    assert "SECRET_KEY is not set" in result.stderr


def test_embedded_default_is_sqlite_under_var(tmp_path):
    result = load_settings(SECRET_KEY="x" * 50, SIROCCO_VAR_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "django.db.backends.sqlite3"


def test_database_url_selects_postgresql(tmp_path):
    result = load_settings(
        SECRET_KEY="x" * 50,
        DATABASE_URL="postgres://postgres@127.0.0.1:5432/test",
        SIROCCO_VAR_DIR=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "django.db.backends.postgresql"


def test_celery_is_json_only_with_late_acks_and_named_queues():
    from controlplane.celery import app

    assert app.conf.task_serializer == "json"
    assert app.conf.accept_content == ["json"]
    assert app.conf.task_acks_late is True
    assert app.conf.task_time_limit and app.conf.task_soft_time_limit
    assert {q.name for q in app.conf.task_queues} == {"default", "provisioning", "billing"}
    assert all(q.routing_key == q.name for q in app.conf.task_queues)


def test_embedded_broker_needs_no_server(settings):
    from django.conf import settings as live

    if os.environ.get("CELERY_BROKER_URL"):
        pytest.skip("a broker URL is configured for this run")
    assert live.CELERY_BROKER_URL.startswith("sqla+sqlite:///")


def test_email_url_configures_smtp(tmp_path):
    code = (
        "import controlplane.settings.base as s; "
        "print(s.EMAIL_BACKEND, s.EMAIL_HOST, s.EMAIL_PORT, s.EMAIL_HOST_USER, s.EMAIL_USE_TLS)"
    )
    base = {k: v for k, v in os.environ.items() if k not in {"SECRET_KEY", "DEBUG", "DATABASE_URL"}}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={
            **base,
            "SECRET_KEY": "x" * 50,
            "SIROCCO_VAR_DIR": str(tmp_path),
            "EMAIL_URL": "smtp+tls://alerts:pw@smtp.example.com:587",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "django.core.mail.backends.smtp.EmailBackend",
        "smtp.example.com",
        "587",
        "alerts",
        "True",
    ]


def test_every_task_is_routed_to_its_apps_queue():
    from controlplane.celery import app

    app.loader.import_default_modules()
    queues = {}
    for name in app.tasks:
        if name.startswith(("deployments.", "billing.")):
            route = app.amqp.router.route({}, name)
            queues[name] = route["queue"].name
    assert queues, "the apps' tasks are registered"
    for name, queue in queues.items():
        expected = "provisioning" if name.startswith("deployments.") else "billing"
        assert queue == expected, name


def test_commands_beside_make_run_read_its_secret_key_file(tmp_path):
    """`make run` writes var/secret_key and exports it; `manage.py create_api_key` in another
    terminal (no SECRET_KEY, no DEBUG) reads the same file instead of refusing to start."""
    (tmp_path / "secret_key").write_text("k" * 60 + "\n")
    base = {k: v for k, v in os.environ.items() if k not in {"SECRET_KEY", "DEBUG", "DATABASE_URL"}}
    result = subprocess.run(
        [sys.executable, "-c", "import controlplane.settings.base as s; print(s.SECRET_KEY)"],
        cwd=ROOT,
        env={**base, "SIROCCO_VAR_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "k" * 60
    result = subprocess.run(
        [sys.executable, "manage.py", "create_api_key", "--help"],
        cwd=ROOT,
        env={**base, "SIROCCO_VAR_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_tls_turns_on_hsts_and_secure_cookies(tmp_path):
    code = (
        "import controlplane.settings.base as s; "
        "print(s.SECURE_HSTS_SECONDS, s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE)"
    )
    base = {k: v for k, v in os.environ.items() if k not in {"DEBUG", "DATABASE_URL"}}
    outputs = []
    for extra in ({}, {"SECURE_SSL": "true"}, {"SECURE_SSL": "true", "SECURE_HSTS_SECONDS": "60"}):
        env = {**base, "SECRET_KEY": "x" * 50, "SIROCCO_VAR_DIR": str(tmp_path), **extra}
        env = {k: v for k, v in env.items() if k not in {"SECURE_SSL", "SESSION_COOKIE_SECURE"}}
        env.update(extra)
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout.split())
    assert outputs == [
        ["0", "False", "False"],
        ["31536000", "True", "True"],
        ["60", "True", "True"],
    ]


def test_celery_task_bookkeeping_stays_out_of_the_log_at_info(tmp_path):
    """`make run` prints the login and key once; at LOG_LEVEL=INFO Celery's line per task
    received, succeeded and sent by beat (several a second) must not bury it, while a failed
    task and our own INFO lines still show. LOG_LEVEL=DEBUG shows everything."""
    code = (
        "import logging, django; django.setup(); "
        "logging.getLogger('celery.app.trace').info('TRACE-INFO'); "
        "logging.getLogger('celery.worker.strategy').info('RECEIVED-INFO'); "
        "logging.getLogger('celery.beat').info('BEAT-INFO'); "
        "logging.getLogger('celery.app.trace').error('TRACE-ERROR'); "
        "logging.getLogger('deployments.tasks').info('OURS-INFO')"
    )
    base = {k: v for k, v in os.environ.items() if k not in {"DEBUG", "DATABASE_URL"}}
    logged = {}
    for level in ("INFO", "DEBUG"):
        env = {
            **base,
            "SECRET_KEY": "x" * 50,
            "SIROCCO_VAR_DIR": str(tmp_path),
            "DJANGO_SETTINGS_MODULE": "controlplane.settings.base",
            "LOG_LEVEL": level,
            "LOG_FORMAT": "text",
        }
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        logged[level] = {
            word
            for word in ("TRACE-INFO", "RECEIVED-INFO", "BEAT-INFO", "TRACE-ERROR", "OURS-INFO")
            if word in result.stderr
        }
    assert logged["INFO"] == {"TRACE-ERROR", "OURS-INFO"}
    assert logged["DEBUG"] == {
        "TRACE-INFO", "RECEIVED-INFO", "BEAT-INFO", "TRACE-ERROR", "OURS-INFO"
    }  # fmt: skip


def test_a_command_beside_make_run_logs_nothing_of_its_own(tmp_path):
    """`manage.py create_api_key` prints the key alone on its last line; starting Django must
    not add log lines of its own (django-axes logged its version at every start)."""
    base = {k: v for k, v in os.environ.items() if k not in {"DEBUG", "DATABASE_URL"}}
    env = {
        **base,
        "SECRET_KEY": "x" * 50,
        "SIROCCO_VAR_DIR": str(tmp_path),
        "DJANGO_SETTINGS_MODULE": "controlplane.settings.base",
        "LOG_LEVEL": "INFO",
    }
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")
