"""Sets of values the chart is rendered with: the defaults and what operators commonly change."""

VARIANTS: dict[str, dict] = {
    "default": {},
    # Credentials in a Secret the chart makes from values, Stripe and S3 keys included.
    "chart-managed-secret": {
        "secrets": {
            "create": True,
            "databaseUrl": "postgres://sirocco:pw@postgres.db:5432/sirocco",
            "redisUrl": "redis://redis.db:6379/0",
            "awsAccessKeyId": "AKIAEXAMPLE",
            "awsSecretAccessKey": "example-secret",
            "stripeApiKey": "sk_test_example",
            "stripeWebhookSecret": "whsec_example",
            "emailUrl": "smtp+tls://alerts:pw@smtp.example.com:587",
        },
        "config": {
            "artifactStoreUrl": "s3://sirocco-weights/models",
            "awsEndpointUrl": "https://minio.storage:9000",
            "awsRegion": "us-east-1",
        },
    },
    "existing-secret": {"secrets": {"existingSecret": "sirocco-credentials"}},
    # Public behind an ingress with TLS, streaming-friendly annotations.
    "ingress-tls": {
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "annotations": {"nginx.ingress.kubernetes.io/proxy-buffering": "off"},
            "hosts": [{"host": "ai.example.com"}, {"host": "api.ai.example.com"}],
            "tls": [
                {"secretName": "sirocco-tls", "hosts": ["ai.example.com", "api.ai.example.com"]}
            ],
        },
        "web": {"service": {"type": "ClusterIP", "port": 8080}},
    },
    # Fixed-size gateway, no budgets, no RBAC (granted out of band), migrations run by hand.
    "minimal": {
        "gateway": {"autoscaling": {"enabled": False}, "replicas": 3},
        "web": {"replicas": 1, "pdb": {"enabled": False, "maxUnavailable": 1}},
        "worker": {
            "pdb": {"enabled": False, "maxUnavailable": 1},
            "livenessProbe": {"enabled": False},
            "queues": ["provisioning"],
            "concurrency": 8,
        },
        "rbac": {"create": False},
        "migrations": {"enabled": False},
    },
    # Pinned by digest from a private registry, scheduled on system nodes, IRSA for S3.
    "scheduling": {
        "fullnameOverride": "maas",
        "image": {
            "repository": "registry.example.com/platform/sirocco",
            "digest": "sha256:" + "ab" * 32,
            "pullPolicy": "Always",
        },
        "imagePullSecrets": [{"name": "registry-credentials"}],
        "serviceAccount": {
            "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/s3"}
        },
        "podLabels": {"team": "platform"},
        "web": {
            "nodeSelector": {"node-role.example.com/system": "true"},
            "tolerations": [{"key": "system", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {
                "podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "weight": 100,
                            "podAffinityTerm": {
                                "topologyKey": "kubernetes.io/hostname",
                                "labelSelector": {
                                    "matchLabels": {"app.kubernetes.io/component": "web"}
                                },
                            },
                        }
                    ]
                }
            },
            "podAnnotations": {"prometheus.io/scrape": "true", "prometheus.io/path": "/metrics"},
        },
        "config": {
            "publicUrl": "https://maas.example.com/",
            "allowedHosts": ["maas.internal"],
            "logLevel": "WARNING",
            "emailBackend": "django.core.mail.backends.console.EmailBackend",
            "defaultFromEmail": "billing@example.com",
            "extraEnv": {"TZ": "UTC"},
        },
    },
}
