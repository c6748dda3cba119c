{{/* Labels every object carries: the kustomize base's own (name and component where it has them), plus the release. */}}
{{- define "podsweep.labels" -}}
{{- with .name }}app.kubernetes.io/name: {{ . }}
{{ end -}}
{{- with .component }}app.kubernetes.io/component: {{ . }}
{{ end -}}
app.kubernetes.io/part-of: podsweep
app.kubernetes.io/instance: {{ .root.Release.Name }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Labels a pod template carries (selectors use name and component only, as in deploy/base). */}}
{{- define "podsweep.podLabels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: podsweep
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{- define "podsweep.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "podsweep.natsUrl" -}}
{{- if .Values.nats.bundled -}}
{{ ternary "tls" "nats" .Values.nats.tls.enabled }}://nats.{{ .Release.Namespace }}.svc:4222
{{- else -}}
{{ required "nats.externalUrl is required when nats.bundled is false (e.g. nats://nats.messaging.svc:4222)" .Values.nats.externalUrl }}
{{- end -}}
{{- end -}}

{{- define "podsweep.s3Endpoint" -}}
{{- if .Values.s3.bundled -}}
http://seaweedfs.{{ .Release.Namespace }}.svc:8333
{{- else -}}
{{ required "s3.endpoint is required when s3.bundled is false (e.g. https://s3.eu-west-1.amazonaws.com)" .Values.s3.endpoint }}
{{- end -}}
{{- end -}}

{{- define "podsweep.trivyServer" -}}
{{- if .Values.trivy.bundled -}}
http://trivy.{{ .Release.Namespace }}.svc:4954
{{- else -}}
{{ required "trivy.externalUrl is required when trivy.bundled is false (e.g. http://trivy.security.svc:4954)" .Values.trivy.externalUrl }}
{{- end -}}
{{- end -}}

{{/* The Secret holding one service's S3 key: its existingSecret, or the chart's s3-<service>. */}}
{{- define "podsweep.s3Secret" -}}
{{ (index .root.Values.s3.credentials .service).existingSecret | default (printf "s3-%s" .service) }}
{{- end -}}

{{- define "podsweep.webhooksSecret" -}}
{{ .Values.webhooks.existingSecret | default "podsweep-webhooks" }}
{{- end -}}

{{/* A secret value: the one given, else the one already in the cluster (so upgrades keep it), else a new random one. */}}
{{- define "podsweep.secretValue" -}}
{{- if .given -}}
{{ .given }}
{{- else -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .secret -}}
{{- if and $existing (hasKey (default dict $existing.data) .key) -}}
{{ index $existing.data .key | b64dec }}
{{- else -}}
{{ randAlphaNum 32 }}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "podsweep.podSecurity" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
fsGroup: {{ .uid }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "podsweep.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* podsweep.yaml, built from the values (the same settings as deploy/base/podsweep.yaml plus the chart's options). */}}
{{- define "podsweep.config" -}}
{{- $v := .Values -}}
{{- $dispatcher := dict
  "trivy_server" (include "podsweep.trivyServer" .)
  "trivy_image" $v.scan.trivyImage
  "podsweep_image" ($v.scan.uploaderImage | default (include "podsweep.image" .))
  "max_active" $v.scan.maxActive
  "max_active_per_node" $v.scan.maxActivePerNode
  "max_created_per_minute" $v.scan.maxCreatedPerMinute
  "job_deadline_s" $v.scan.jobDeadlineSeconds
  "rescan_interval_s" $v.scan.rescanIntervalSeconds
  "scan_requests_cpu" (dig "requests" "cpu" "100m" $v.scan.resources)
  "scan_requests_memory" (dig "requests" "memory" "256Mi" $v.scan.resources)
  "scan_limits_cpu" (dig "limits" "cpu" "" $v.scan.resources)
  "scan_limits_memory" (dig "limits" "memory" "1Gi" $v.scan.resources) -}}
{{- /* TLS (bundled) is switched on by PODSWEEP_NATS_URL on each Deployment, as overlays/prod does. */ -}}
{{- $natsUrl := ternary (printf "nats://nats.%s.svc:4222" .Release.Namespace) (include "podsweep.natsUrl" .) .Values.nats.bundled -}}
{{- $config := dict
  "cluster" $v.cluster
  "namespace" .Release.Namespace
  "log_level" $v.logLevel
  "log_format" "json"
  "nats" (dict "url" $natsUrl "subject_root" "podsweep" "stream" "PODSWEEP" "kv_prefix" "podsweep")
  "s3" (dict "endpoint_url" "" "region" $v.s3.region "bucket" $v.s3.bucket "path_style" $v.s3.pathStyle)
  "telemetry" (dict "traces" "none" "metrics" "none" "metrics_port" 9090)
  "dispatcher" $dispatcher
  "admission" (dict "default_mode" $v.admission.mode "namespace_modes" $v.admission.namespaceModes) -}}
{{- toYaml (mustMergeOverwrite $config (deepCopy $v.extraConfig)) -}}
{{- end -}}

{{/*
One podsweep service's Deployment, shaped as deploy/base/<service>.yaml. Arguments: root, name, replicas, token (the
pod gets an API token), podName (POD_NAME from the downward API), s3, policy, webhooks, admission (the gate's port,
serving pair and spread), tmp (the /tmp size).
*/}}
{{- define "podsweep.service" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "podsweep.labels" (dict "root" $root "name" "podsweep" "component" .name) | nindent 4 }}
spec:
  replicas: {{ .replicas }}
  revisionHistoryLimit: 3
  selector:
    matchLabels:
      app.kubernetes.io/name: podsweep
      app.kubernetes.io/component: {{ .name }}
  template:
    metadata:
      labels:
        {{- include "podsweep.podLabels" (dict "root" $root "name" "podsweep" "component" .name) | nindent 8 }}
      annotations:
        # Rolls the pods when the settings change (kustomize's hash suffix does this for deploy/base).
        checksum/config: {{ include "podsweep.config" $root | sha256sum }}
        checksum/policy: {{ toYaml $v.policy | sha256sum }}
    spec:
      serviceAccountName: {{ .name }}
      {{- if not .token }}
      automountServiceAccountToken: false
      {{- end }}
      {{- with $v.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      # SIGTERM stops fetching, finishes the events in flight and acks them (docs/architecture.md).
      terminationGracePeriodSeconds: {{ ternary 30 60 (.admission | default false) }}
      securityContext:
        {{- include "podsweep.podSecurity" (dict "uid" 65532) | nindent 8 }}
      {{- if .admission }}
      # One replica per node where possible: a node that goes away takes at most one of them.
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: ScheduleAnyway
          labelSelector:
            matchLabels:
              app.kubernetes.io/name: podsweep
              app.kubernetes.io/component: admission
      {{- end }}
      containers:
        - name: {{ .name }}
          image: {{ include "podsweep.image" $root }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          args: [run, {{ .name }}]
          env:
            {{- if .podName }}
            - name: POD_NAME  # names this replica in the dispatcher lease
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
            {{- end }}
            - name: PODSWEEP_CONFIG
              value: /etc/podsweep/podsweep.yaml
            - name: PODSWEEP_NATS_USER
              value: {{ .name }}
            - name: PODSWEEP_NATS_PASSWORD_FILE
              value: /var/run/secrets/podsweep/nats/password
            {{- if .s3 }}
            - name: PODSWEEP_S3_ACCESS_KEY_ID_FILE
              value: /var/run/secrets/podsweep/s3/access-key-id
            - name: PODSWEEP_S3_SECRET_ACCESS_KEY_FILE
              value: /var/run/secrets/podsweep/s3/secret-access-key
            {{- end }}
            {{- if .policy }}
            - name: PODSWEEP_NOTIFIER_POLICY_FILE
              value: /etc/podsweep/policy.yaml
            {{- end }}
            {{- if .admission }}
            - name: PODSWEEP_ADMISSION_CERT_FILE
              value: /var/run/secrets/podsweep/admission-tls/tls.crt
            - name: PODSWEEP_ADMISSION_KEY_FILE
              value: /var/run/secrets/podsweep/admission-tls/tls.key
            {{- end }}
            {{- $natsReplicas := include "podsweep.natsReplicas" $root }}
            {{- if ne $natsReplicas "1" }}
            - name: PODSWEEP_NATS_REPLICAS
              value: {{ $natsReplicas | quote }}
            {{- end }}
            {{- if and $v.nats.bundled $v.nats.tls.enabled }}
            - name: PODSWEEP_NATS_URL
              value: {{ include "podsweep.natsUrl" $root }}
            - name: PODSWEEP_NATS_TLS_CA_FILE
              value: /var/run/secrets/podsweep/nats-tls/ca.crt
            - name: PODSWEEP_NATS_TLS_CERT_FILE
              value: /var/run/secrets/podsweep/nats-tls/tls.crt
            - name: PODSWEEP_NATS_TLS_KEY_FILE
              value: /var/run/secrets/podsweep/nats-tls/tls.key
            {{- end }}
            - name: PODSWEEP_S3_ENDPOINT_URL
              value: {{ include "podsweep.s3Endpoint" $root }}
          ports:
            {{- if .admission }}
            - name: https
              containerPort: 8443
            {{- end }}
            - name: metrics
              containerPort: 9090
          livenessProbe:
            httpGet: {path: /healthz, port: metrics}
            periodSeconds: 20
            failureThreshold: 3
          readinessProbe:
            httpGet: {path: /readyz, port: metrics}
            periodSeconds: {{ ternary 5 10 (.admission | default false) }}
          resources:
            {{- toYaml (index $v.resources .name) | nindent 12 }}
          securityContext:
            {{- include "podsweep.containerSecurity" . | nindent 12 }}
          volumeMounts:
            - name: config
              mountPath: /etc/podsweep
              readOnly: true
            - name: nats-auth
              mountPath: /var/run/secrets/podsweep/nats
              readOnly: true
            {{- if .s3 }}
            - name: s3
              mountPath: /var/run/secrets/podsweep/s3
              readOnly: true
            {{- end }}
            {{- if .webhooks }}
            - name: webhooks
              mountPath: /var/run/secrets/podsweep/webhooks
              readOnly: true
            {{- end }}
            {{- if .admission }}
            - name: admission-tls
              mountPath: /var/run/secrets/podsweep/admission-tls
              readOnly: true
            {{- end }}
            {{- if and $v.nats.bundled $v.nats.tls.enabled }}
            - name: nats-tls
              mountPath: /var/run/secrets/podsweep/nats-tls
              readOnly: true
            {{- end }}
            - name: tmp
              mountPath: /tmp
      volumes:
        - name: config
          configMap:
            name: podsweep-config
        - name: nats-auth
          secret:
            secretName: nats-{{ .name }}
            defaultMode: 0440
        {{- if .s3 }}
        - name: s3
          secret:
            secretName: {{ include "podsweep.s3Secret" (dict "root" $root "service" .name) }}
            defaultMode: 0440
        {{- end }}
        {{- if .webhooks }}
        - name: webhooks
          secret:
            secretName: {{ include "podsweep.webhooksSecret" $root }}
            defaultMode: 0440
        {{- end }}
        {{- if .admission }}
        - name: admission-tls
          secret:
            secretName: {{ $v.admission.certificates.secretName }}
            defaultMode: 0440
        {{- end }}
        {{- if and $v.nats.bundled $v.nats.tls.enabled }}
        - name: nats-tls
          secret:
            secretName: nats-client-tls
            defaultMode: 0440
        {{- end }}
        - name: tmp
          emptyDir:
            sizeLimit: {{ .tmp | default "256Mi" }}
{{- end -}}

{{/* Replicas of every stream and KV bucket podsweep creates: nats.replicas, or 3 for the bundled cluster, else 1. */}}
{{- define "podsweep.natsReplicas" -}}
{{- if gt (int .Values.nats.replicas) 0 -}}
{{ .Values.nats.replicas }}
{{- else if and .Values.nats.bundled (eq .Values.nats.mode "cluster") -}}
3
{{- else -}}
1
{{- end -}}
{{- end -}}

{{/* The bundled cluster's routes: every server of the StatefulSet by its name under the headless Service. */}}
{{- define "podsweep.natsRoutes" -}}
{{- $ns := .Release.Namespace -}}
{{- $routes := list -}}
{{- range $i := until 3 -}}
{{- $routes = append $routes (printf "nats://nats-%d.nats-headless.%s.svc:6222" $i $ns) -}}
{{- end -}}
{{- join "," $routes -}}
{{- end -}}
