"""Puts the Serve application on a Ray cluster through the dashboard's declarative REST API (what `serve deploy`
uses), so the controller needs no Ray driver of its own.

The served models are the deployments' user_config: changing them reconfigures the running replicas in place.
Other Serve applications on the cluster are kept as they are (the REST API replaces the whole set).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from dreambooth.ray_dashboard import WORKER_ENV, RequestTimeout
from serving import access
from serving.config import ServeConfig

log = logging.getLogger(__name__)

IMPORT_PATH = "serving.app:build_app"
DEPLOYMENTS = ("Generator", "Ingress")  # the deployment names (serving/generator.py, serving/app.py)


class ServeDeployer:
    def __init__(self, dashboard_url: str, config: ServeConfig, timeout_s: float = 60):
        self.dashboard_url = dashboard_url
        self.config = config
        # Per REST call (the first PUT starts Serve: seconds); a hung dashboard must not hold the deploys for ever.
        self.timeout_s = timeout_s

    def application(
        self,
        models: Mapping[str, str],
        owners: Mapping[str, str] | None = None,
        tenant_tokens: Mapping[str, Iterable[str]] | None = None,
    ) -> dict[str, Any]:
        """This application's declarative config serving `models` ({model_id: model directory}); with
        `tenant_tokens` ({tenant: bearer tokens}), each model only to its tenant in `owners`."""
        user_config = access.user_config(models, owners or {}, tenant_tokens or {})
        return {
            "name": self.config.app_name,
            "route_prefix": self.config.route_prefix,
            "import_path": IMPORT_PATH,
            "args": self.config.to_dict(),
            "runtime_env": {"env_vars": dict(WORKER_ENV)},
            "deployments": [{"name": name, "user_config": user_config} for name in DEPLOYMENTS],
        }

    def apply(
        self,
        models: Mapping[str, str],
        owners: Mapping[str, str] | None = None,
        tenant_tokens: Mapping[str, Iterable[str]] | None = None,
    ) -> frozenset[str]:
        """Deploys (or reconfigures) the application so that exactly `models` are served (see `application`).
        Returns the models the application was given before (its replicas may serve them until they run this)."""
        client = self._client()
        details = client.get_serve_details()
        if ignored := self.ignored_options(details):
            log.error(
                "Ray Serve runs with %s: a running Serve keeps the HTTP options it started with (the dashboard takes "
                "the new ones without a word), so clients are sent where it does not listen; stop Serve on the "
                "cluster (`serve shutdown` on the head): the controller starts it again with its options",
                ", ".join(ignored),
            )
        others = [
            app["deployed_app_config"]
            for name, app in (details.get("applications") or {}).items()
            if name != self.config.app_name and app.get("deployed_app_config")
        ]
        client.deploy_applications(
            {
                "proxy_location": self.config.proxy_location,
                "http_options": {"host": self.config.http_host, "port": self.config.http_port},
                "applications": [*others, self.application(models, owners, tenant_tokens)],
            }
        )
        before = ((details.get("applications") or {}).get(self.config.app_name) or {}).get("deployed_app_config") or {}
        return frozenset(
            model_id
            for deployment in before.get("deployments") or []
            for model_id in ((deployment.get("user_config") or {}).get("models") or {})
        )

    def ignored_options(self, details: Mapping[str, Any]) -> list[str]:
        """This config's HTTP options that Serve, as `details` (get_serve_details) has it running, is not using:
        "setting value (configured: value)" each."""
        if not details.get("controller_info"):
            return []  # not running: an apply starts it with this config's
        http = details.get("http_options") or {}
        running = {
            "http_host": http.get("host"),
            "http_port": http.get("port"),
            "proxy_location": details.get("proxy_location"),
        }
        return [
            f"{name} {value!r} (configured: {getattr(self.config, name)!r})"
            for name, value in running.items()
            if value is not None and value != getattr(self.config, name)
        ]

    def status(self) -> str:
        """The application's Serve status (RUNNING, DEPLOYING, DEPLOY_FAILED, ...), or NOT_DEPLOYED."""
        app = self._details()
        return app["status"] if app else "NOT_DEPLOYED"

    def message(self) -> str:
        """Why the application is not running, as Serve reports it per deployment."""
        app = self._details() or {}
        lines = [app.get("message") or ""]
        for name, deployment in (app.get("deployments") or {}).items():
            if deployment.get("message"):
                lines.append(f"{name}: {deployment['status']}: {deployment['message']}")
        return "\n".join(line for line in lines if line)

    def _details(self) -> dict[str, Any] | None:
        return (self._client().get_serve_details().get("applications") or {}).get(self.config.app_name)

    def _client(self):
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        class Client(RequestTimeout, ServeSubmissionClient):
            timeout_s = self.timeout_s

        return Client(self.dashboard_url)
