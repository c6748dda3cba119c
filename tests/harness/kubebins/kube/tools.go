//go:build tools

// Package kube pins the Kubernetes control-plane binaries that podsweep's
// integration tests run. Nothing here ships; ../build.sh compiles them into a
// cache directory keyed by version.
package kube

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
