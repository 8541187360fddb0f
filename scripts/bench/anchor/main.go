// Command stargz-anchor serves the Go stargz snapshotter (Debian's stargz-snapshotter 0.12
// library) to containerd as a proxy snapshotter. It is the reference lazysnap is benchmarked
// against: the library's own filesystem and snapshotter with its default settings, wired to
// a gRPC socket with nothing added.
//
// Registries listed in -plain-http are reached over HTTP (the bench registries); every other
// host over HTTPS. Settings of the library ([fs] section of upstream's config.toml, top level
// keys here) may be given in a TOML file with -config.
//
// SIGINT or SIGTERM: unmount every layer, close the snapshotter and exit.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/BurntSushi/toml"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/reference"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/containerd/snapshots/overlay/overlayutils"
	stargzfs "github.com/containerd/stargz-snapshotter/fs"
	fsconfig "github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/layer"
	"github.com/containerd/stargz-snapshotter/fs/source"
	snbase "github.com/containerd/stargz-snapshotter/snapshot"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

func main() {
	address := flag.String("address", "", "unix socket to serve the Snapshots API on (required)")
	root := flag.String("root", "", "state directory (required)")
	configPath := flag.String("config", "", "optional TOML file with stargz filesystem settings")
	plainHTTP := flag.String("plain-http", "", "comma-separated registry hosts reached over HTTP")
	logLevel := flag.String("log-level", "info", "logrus level")
	flag.Parse()
	if *address == "" || *root == "" {
		fmt.Fprintln(os.Stderr, "usage: stargz-anchor -address SOCKET -root DIR [-config FILE] [-plain-http HOSTS]")
		os.Exit(2)
	}
	lvl, err := logrus.ParseLevel(*logLevel)
	if err != nil {
		fail("bad -log-level", err)
	}
	logrus.SetLevel(lvl)
	ctx := log.WithLogger(context.Background(), log.L)

	var cfg fsconfig.Config
	if *configPath != "" {
		if _, err := toml.DecodeFile(*configPath, &cfg); err != nil {
			fail("reading "+*configPath, err)
		}
	}

	snRoot := filepath.Join(*root, "snapshotter")
	if err := os.MkdirAll(snRoot, 0o700); err != nil {
		fail("creating root", err)
	}
	// Same choice as upstream: user.* opaque xattrs only where trusted.* cannot be used.
	opaque := layer.OverlayOpaqueTrusted
	if user, err := overlayutils.NeedsUserXAttr(snRoot); err == nil && user {
		opaque = layer.OverlayOpaqueUser
	}
	hosts := registryHosts(strings.Split(*plainHTTP, ","))
	fs, err := stargzfs.NewFilesystem(filepath.Join(*root, "stargz"), cfg,
		stargzfs.WithGetSources(source.FromDefaultLabels(hosts)),
		stargzfs.WithOverlayOpaqueType(opaque))
	if err != nil {
		fail("creating the stargz filesystem", err)
	}
	sn, err := snbase.NewSnapshotter(ctx, snRoot, fs, snbase.AsynchronousRemove)
	if err != nil {
		fail("creating the snapshotter", err)
	}

	if err := os.MkdirAll(filepath.Dir(*address), 0o700); err != nil {
		fail("creating the socket directory", err)
	}
	_ = os.Remove(*address)
	listener, err := net.Listen("unix", *address)
	if err != nil {
		fail("listening on "+*address, err)
	}
	server := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(server, snapshotservice.FromSnapshotter(sn))
	served := make(chan error, 1)
	go func() { served <- server.Serve(listener) }()
	log.G(ctx).WithField("address", *address).Info("stargz-anchor serving")

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	select {
	case s := <-signals:
		log.G(ctx).Infof("%v: unmounting and closing", s)
	case err := <-served:
		log.G(ctx).WithError(err).Error("gRPC server stopped")
	}
	server.Stop()
	if err := sn.Close(); err != nil {
		log.G(ctx).WithError(err).Error("closing the snapshotter")
		os.Exit(1)
	}
}

// registryHosts resolves every registry to one host; `plain` ones are spoken to over HTTP.
func registryHosts(plain []string) source.RegistryHosts {
	overHTTP := map[string]bool{}
	for _, h := range plain {
		if h != "" {
			overHTTP[h] = true
		}
	}
	client := &http.Client{Transport: &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       90 * time.Second,
		ResponseHeaderTimeout: 60 * time.Second,
	}}
	return func(ref reference.Spec) ([]docker.RegistryHost, error) {
		host := ref.Hostname()
		scheme := "https"
		if overHTTP[host] {
			scheme = "http"
		}
		return []docker.RegistryHost{{
			Client:       client,
			Host:         host,
			Scheme:       scheme,
			Path:         "/v2",
			Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve,
		}}, nil
	}
}

func fail(what string, err error) {
	fmt.Fprintf(os.Stderr, "stargz-anchor: %s: %v\n", what, err)
	os.Exit(1)
}
