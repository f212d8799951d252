{{/* Names ---------------------------------------------------------------------------------- */}}

{{- define "sirocco.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name; object names append a component ("-web"), so keep it short. */}}
{{- define "sirocco.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "sirocco.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sirocco.secretName" -}}
{{- default (include "sirocco.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "sirocco.serviceAccountName" -}}
{{- include "sirocco.fullname" . }}
{{- end }}

{{/* The worker's own account: the only one bound to the provisioner's ClusterRole. */}}
{{- define "sirocco.provisionerServiceAccountName" -}}
{{- printf "%s-provisioner" (include "sirocco.fullname" .) }}
{{- end }}

{{/* Labels: call with (dict "root" $ "component" "web"). ------------------------------------ */}}

{{- define "sirocco.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sirocco.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{- define "sirocco.labels" -}}
helm.sh/chart: {{ include "sirocco.chart" .root }}
{{ include "sirocco.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: sirocco
{{- end }}

{{/* Image ------------------------------------------------------------------------------------ */}}

{{- define "sirocco.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Settings --------------------------------------------------------------------------------- */}}

{{- define "sirocco.publicUrl" -}}
{{- if .Values.config.publicUrl }}
{{- .Values.config.publicUrl | trimSuffix "/" }}
{{- else if and .Values.ingress.enabled .Values.ingress.hosts }}
{{- $host := (first .Values.ingress.hosts).host }}
{{- $tls := false }}
{{- range .Values.ingress.tls }}
{{- if has $host (default list .hosts) }}{{ $tls = true }}{{ end }}
{{- end }}
{{- printf "%s://%s" (ternary "https" "http" $tls) $host }}
{{- end }}
{{- end }}

{{/*
Host names Django accepts: the configured ones, the ingress hosts, the public URL's host, the
in-cluster Service names (other pods call the gateway by them) and localhost, which the kubelet's
probes send as their Host header.
*/}}
{{- define "sirocco.allowedHosts" -}}
{{- $fullname := include "sirocco.fullname" . }}
{{- $hosts := list "localhost" }}
{{- range .Values.config.allowedHosts }}{{ $hosts = append $hosts . }}{{ end }}
{{- if .Values.ingress.enabled }}
{{- range .Values.ingress.hosts }}{{ $hosts = append $hosts .host }}{{ end }}
{{- end }}
{{- with include "sirocco.publicUrl" . }}
{{- $hosts = append $hosts (urlParse .).hostname }}
{{- end }}
{{- range $component := list "web" "gateway" }}
{{- $service := printf "%s-%s" $fullname $component }}
{{- $hosts = append $hosts $service }}
{{- $hosts = append $hosts (printf "%s.%s" $service $.Release.Namespace) }}
{{- $hosts = append $hosts (printf "%s.%s.svc" $service $.Release.Namespace) }}
{{- end }}
{{- $hosts | uniq | join "," }}
{{- end }}

{{- define "sirocco.csrfTrustedOrigins" -}}
{{- if .Values.config.csrfTrustedOrigins }}
{{- .Values.config.csrfTrustedOrigins | join "," }}
{{- else }}
{{- with include "sirocco.publicUrl" . }}
{{- $url := urlParse . }}
{{- printf "%s://%s" $url.scheme $url.host }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Hook annotations for what the migrations Job reads: it runs before the release's ordinary
objects exist, so its ConfigMap and Secret are hooks too, made just before it. pre-rollback
puts the previous release's settings back with its Deployments.
*/}}
{{- define "sirocco.settingsHookAnnotations" -}}
helm.sh/hook: pre-install,pre-upgrade,pre-rollback
helm.sh/hook-weight: "-10"
helm.sh/hook-delete-policy: before-hook-creation
{{- end }}

{{/* The settings the chart sets in the ConfigMap, as a YAML map (config.extraEnv comes on top). */}}
{{- define "sirocco.settings" -}}
# Inference workloads are made through this cluster's API (the worker's ServiceAccount).
SIROCCO_PROVISIONER: kubernetes
SIROCCO_PORT: "8000"
ALLOWED_HOSTS: {{ include "sirocco.allowedHosts" . | quote }}
{{- with include "sirocco.csrfTrustedOrigins" . }}
CSRF_TRUSTED_ORIGINS: {{ . | quote }}
{{- end }}
{{- with include "sirocco.publicUrl" . }}
SIROCCO_PUBLIC_URL: {{ . | quote }}
{{- end }}
SECURE_SSL: {{ .Values.config.secureSsl | quote }}
{{- /* The Ingress controller appends the client's address to X-Forwarded-For (login records). */}}
TRUSTED_PROXY_COUNT: {{ ternary "1" "0" .Values.ingress.enabled | quote }}
LOG_LEVEL: {{ .Values.config.logLevel | quote }}
LOG_FORMAT: {{ .Values.config.logFormat | quote }}
DATABASE_CONN_MAX_AGE: {{ .Values.config.databaseConnMaxAge | quote }}
{{- with .Values.config.emailBackend }}
EMAIL_BACKEND: {{ . | quote }}
{{- end }}
{{- with .Values.config.defaultFromEmail }}
DEFAULT_FROM_EMAIL: {{ . | quote }}
{{- end }}
{{- with .Values.config.artifactStoreUrl }}
ARTIFACT_STORE_URL: {{ . | quote }}
{{- end }}
{{- with .Values.config.awsEndpointUrl }}
AWS_ENDPOINT_URL: {{ . | quote }}
{{- end }}
{{- with .Values.config.awsRegion }}
AWS_DEFAULT_REGION: {{ . | quote }}
{{- end }}
{{- with .Values.provisioner }}
SIROCCO_K8S_NAMESPACE_PREFIX: {{ .namespacePrefix | quote }}
SIROCCO_K8S_FETCHER_IMAGE: {{ .fetcherImage | quote }}
SIROCCO_K8S_ARTIFACT_SECRET: {{ .artifactSecret | quote }}
{{- with default $.Values.config.awsEndpointUrl .awsEndpointUrl }}
SIROCCO_K8S_AWS_ENDPOINT_URL: {{ . | quote }}
{{- end }}
{{- with .artifactEgress }}
SIROCCO_K8S_ARTIFACT_EGRESS_CIDRS: {{ .cidrs | join "," | quote }}
SIROCCO_K8S_ARTIFACT_EGRESS_EXCEPT: {{ .except | join "," | quote }}
SIROCCO_K8S_ARTIFACT_EGRESS_PORTS: {{ .ports | join "," | quote }}
{{- end }}
{{- end }}
{{- if .Values.rbac.create }}
{{- /* The provisioner binds the tenant role to its own account in each namespace it makes. */}}
SIROCCO_K8S_TENANT_ROLE: {{ include "sirocco.tenantRoleName" . | quote }}
SIROCCO_K8S_TENANT_ROLE_SUBJECT: {{ printf "system:serviceaccount:%s:%s" .Release.Namespace (include "sirocco.provisionerServiceAccountName" .) | quote }}
{{- end }}
{{- /* Model servers admit traffic from the gateway's pods only: tell the provisioner which. */}}
SIROCCO_K8S_GATEWAY_NAMESPACE: {{ .Release.Namespace | quote }}
{{- $labels := list }}
{{- range $key, $value := include "sirocco.selectorLabels" (dict "root" . "component" "gateway") | fromYaml }}
{{- $labels = append $labels (printf "%s=%s" $key $value) }}
{{- end }}
SIROCCO_K8S_GATEWAY_POD_LABELS: {{ $labels | join "," | quote }}
{{- with .Values.gateway }}
GATEWAY_ORG_RPM_LIMIT: {{ .organizationRequestsPerMinute | int64 | quote }}
GATEWAY_ORG_TPM_LIMIT: {{ .organizationTokensPerMinute | int64 | quote }}
GATEWAY_MAX_BODY_BYTES: {{ .maxBodyBytes | int64 | quote }}
GATEWAY_SCALE_FROM_ZERO_WAIT: {{ .scaleFromZeroWaitSeconds | quote }}
GATEWAY_FIRST_BYTE_TIMEOUT: {{ .firstByteTimeoutSeconds | quote }}
{{- end }}
{{- /* The gateway's pods mount gateway.usageSpool.volume here; elsewhere it is under var. */}}
GATEWAY_USAGE_SPOOL_DIR: {{ include "sirocco.usageSpoolDir" . | quote }}
BILLING_PERIOD: {{ .Values.billing.period | quote }}
BILLING_TAX_RATE: {{ .Values.billing.taxRate | quote }}
BILLING_INVOICE_PREFIX: {{ .Values.billing.invoicePrefix | quote }}
{{- end }}

{{- define "sirocco.usageSpoolDir" -}}
/var/lib/sirocco/usage-spool
{{- end }}

{{/* Names of the settings read from the Secret: required ones first, then optional ones. */}}
{{- define "sirocco.requiredSecretKeys" -}}
SECRET_KEY DATABASE_URL REDIS_URL CELERY_BROKER_URL
{{- end }}
{{- define "sirocco.optionalSecretKeys" -}}
AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY STRIPE_API_KEY STRIPE_WEBHOOK_SECRET EMAIL_URL METRICS_TOKEN PROVIDER_CREDENTIAL_KEYS
{{- end }}

{{/* Environment of every container: the ConfigMap, then each credential from the Secret. */}}
{{- define "sirocco.env" -}}
envFrom:
  - configMapRef:
      name: {{ include "sirocco.fullname" . }}
env:
  {{- $secretName := include "sirocco.secretName" . }}
  {{- range $name := splitList " " (include "sirocco.requiredSecretKeys" .) }}
  - name: {{ $name }}
    valueFrom:
      secretKeyRef:
        name: {{ $secretName }}
        key: {{ $name }}
  {{- end }}
  {{- range $name := splitList " " (include "sirocco.optionalSecretKeys" .) }}
  - name: {{ $name }}
    valueFrom:
      secretKeyRef:
        name: {{ $secretName }}
        key: {{ $name }}
        optional: true
  {{- end }}
{{- end }}

{{/* Restart pods when the settings they read at start change. */}}
{{- define "sirocco.configChecksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- if .Values.secrets.create }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}
{{- end }}

{{/*
A pod template for one process: call with
(dict "root" $ "component" "web" "values" .Values.web "command" (list …) "container" "<yaml>"
      "serviceAccountName" "…" "automountToken" false "pod" "<yaml>").
"container" adds keys to the container (ports, probes), "pod" adds keys to the pod spec,
"volumeMounts" and "volumes" add entries (YAML lists) to the two fixed ones.
*/}}
{{- define "sirocco.podTemplate" -}}
{{- $root := .root -}}
metadata:
  labels:
    {{- include "sirocco.labels" . | nindent 4 }}
    {{- with $root.Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    {{- include "sirocco.configChecksums" $root | nindent 4 }}
    {{- with .values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- with .serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  automountServiceAccountToken: {{ .automountToken }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with .pod }}
  {{- . | nindent 2 }}
  {{- end }}
  containers:
    - name: {{ .component }}
      image: {{ include "sirocco.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      command:
        {{- toYaml .command | nindent 8 }}
      {{- include "sirocco.env" $root | nindent 6 }}
      {{- with .container }}
      {{- . | nindent 6 }}
      {{- end }}
      resources:
        {{- toYaml .values.resources | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: var
          mountPath: /var/lib/sirocco
        {{- with .volumeMounts }}
        {{- . | nindent 8 }}
        {{- end }}
  volumes:
    # The root filesystem is read-only; these are the only places a process writes.
    - name: tmp
      emptyDir: {}
    - name: var
      emptyDir: {}
    {{- with .volumes }}
    {{- . | nindent 4 }}
    {{- end }}
  {{- with .values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* The probes of the two HTTP processes (web and gateway). */}}
{{- define "sirocco.httpProbes" -}}
ports:
  - name: http
    containerPort: 8000
    protocol: TCP
startupProbe:
  httpGet: {path: /healthz, port: http, httpHeaders: [{name: Host, value: localhost}]}
  periodSeconds: 2
  failureThreshold: 60
livenessProbe:
  httpGet: {path: /healthz, port: http, httpHeaders: [{name: Host, value: localhost}]}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  # /readyz checks the database and the broker: a pod that cannot reach them takes no traffic.
  httpGet: {path: /readyz, port: http, httpHeaders: [{name: Host, value: localhost}]}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
{{- end }}

{{/* Cluster-scoped names carry the namespace: two releases of one name must not collide. */}}
{{- define "sirocco.clusterRoleName" -}}
{{- compact (list .Release.Namespace (include "sirocco.fullname" .) "provisioner") | join "-" }}
{{- end }}

{{/* The worker's rights inside an organization's namespace: a ClusterRole the chart defines but
never binds cluster-wide; the provisioner binds it in each namespace it makes. */}}
{{- define "sirocco.tenantRoleName" -}}
{{- printf "%s-tenant" (include "sirocco.clusterRoleName" .) }}
{{- end }}

{{/*
Rules across several values, which values.schema.json cannot say clearly: each failure names
the values to change.
*/}}
{{- define "sirocco.validate" -}}
{{- $s := .Values.secrets }}
{{- if and $s.create $s.existingSecret }}
{{- fail "secrets.create=true makes the chart's own Secret, so secrets.existingSecret would be ignored: set one or the other" }}
{{- end }}
{{- if not $s.create }}
{{- range $key := list "secretKey" "databaseUrl" "redisUrl" "celeryBrokerUrl" "awsAccessKeyId" "awsSecretAccessKey" "stripeApiKey" "stripeWebhookSecret" "emailUrl" }}
{{- if index $s $key }}
{{- fail (printf "secrets.%s is set but secrets.create is false, so it would be ignored: set secrets.create=true, or put the value in the Secret %q instead" $key (include "sirocco.secretName" $)) }}
{{- end }}
{{- end }}
{{- end }}
{{- $taken := keys (include "sirocco.settings" . | fromYaml) }}
{{- $taken = concat $taken (splitList " " (include "sirocco.requiredSecretKeys" .)) (splitList " " (include "sirocco.optionalSecretKeys" .)) }}
{{- range $name := keys .Values.config.extraEnv | sortAlpha }}
{{- if has $name $taken }}
{{- fail (printf "config.extraEnv.%s is a setting the chart already sets: use the chart's own value for it (see values.yaml) instead of extraEnv" $name) }}
{{- end }}
{{- end }}
{{- if hasPrefix .Values.provisioner.namespacePrefix .Release.Namespace }}
{{- fail (printf "the release's namespace %q starts with provisioner.namespacePrefix %q, so the worker would treat it as an organization's: install into another namespace or change the prefix" .Release.Namespace .Values.provisioner.namespacePrefix) }}
{{- end }}
{{- if and .Values.ingress.enabled (not .Values.ingress.hosts) }}
{{- fail "ingress.enabled=true needs at least one entry in ingress.hosts" }}
{{- end }}
{{- with .Values.gateway.autoscaling }}
{{- if and .enabled (gt (int .minReplicas) (int .maxReplicas)) }}
{{- fail (printf "gateway.autoscaling.minReplicas (%d) is above gateway.autoscaling.maxReplicas (%d)" (int .minReplicas) (int .maxReplicas)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* What the Ingress routes to web, besides the console's home page `/` (Exact): the REST API,
static files and the console's pages (console/urls.py; tests/helm/test_ingress.py keeps the two
lists equal). */}}
{{- define "sirocco.webIngressPrefixes" -}}
/api/ /static/ /login/ /logout/ /password-reset/ /organization/ /models/ /deployments/ /playground/ /usage/ /invoices/ /api-keys/ /settings/ /projects/ /publisher/
{{- end }}
