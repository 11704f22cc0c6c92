// Command csi-hostpath is a CSI driver that keeps each volume and each snapshot as a directory on the node,
// for a single-node test cluster. It serves the CSI identity, controller and node services on one socket
// and registers itself with the kubelet through the plugin-registration socket, so no
// node-driver-registrar is needed.
//
// Volumes are directories (capacity is recorded, not enforced); a snapshot is a full copy made with
// `cp -a` (owners, modes and times kept), ready as soon as CreateSnapshot returns; a volume can be made
// from a snapshot or cloned from another volume. Publishing is a bind mount (read-only when asked).
//
// The upstream csi-driver-host-path is not served by the Go module proxy these machines reach; this
// driver implements the part of it that the external-provisioner and external-snapshotter use.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
	"k8s.io/klog/v2"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
	mount "k8s.io/mount-utils"
)

const (
	version       = "1.0.0"
	defaultSize   = 1 << 30
	metaFile      = "meta.json"
	dataDir       = "data"
	volumesDir    = "volumes"
	snapshotsDir  = "snapshots"
	maxNameLength = 128
)

// Names the sidecars give (pvc-<uid>, snapshot-<uid>) are used as IDs; anything else is refused so an ID
// can never leave the state directory.
var validName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)

type volumeMeta struct {
	Name       string `json:"name"`
	Capacity   int64  `json:"capacity"`
	SourceSnap string `json:"sourceSnapshot,omitempty"`
	SourceVol  string `json:"sourceVolume,omitempty"`
}

type snapshotMeta struct {
	Name         string    `json:"name"`
	SourceVolume string    `json:"sourceVolume"`
	Size         int64     `json:"size"`
	CreatedAt    time.Time `json:"createdAt"`
}

type driver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedControllerServer
	csi.UnimplementedNodeServer

	name     string
	nodeID   string
	stateDir string
	mounter  mount.Interface
	mu       sync.Mutex
}

func main() {
	klog.InitFlags(nil)
	endpoint := flag.String("endpoint", "/var/lib/kubelet/plugins/hostpath.csi.k8s.io/csi.sock", "path of the CSI socket")
	registration := flag.String("registration-dir", "/var/lib/kubelet/plugins_registry", "the kubelet's plugin-registration directory; empty: do not register")
	name := flag.String("drivername", "hostpath.csi.k8s.io", "CSI driver name")
	nodeID := flag.String("nodeid", "", "node name (required)")
	stateDir := flag.String("statedir", "/var/lib/csi-hostpath-data", "where volumes and snapshots are kept")
	flag.Parse()
	if *nodeID == "" {
		klog.Fatal("--nodeid is required")
	}
	d := &driver{name: *name, nodeID: *nodeID, stateDir: *stateDir, mounter: mount.New("")}
	for _, dir := range []string{volumesDir, snapshotsDir} {
		if err := os.MkdirAll(filepath.Join(d.stateDir, dir), 0o700); err != nil {
			klog.Fatalf("state directory: %v", err)
		}
	}

	csiServer := grpc.NewServer(grpc.UnaryInterceptor(logCalls))
	csi.RegisterIdentityServer(csiServer, d)
	csi.RegisterControllerServer(csiServer, d)
	csi.RegisterNodeServer(csiServer, d)
	stopCSI := serve(csiServer, *endpoint)

	stopReg := func() {}
	if *registration != "" {
		regServer := grpc.NewServer()
		registerapi.RegisterRegistrationServer(regServer, &registrar{name: d.name, endpoint: *endpoint})
		stopReg = serve(regServer, filepath.Join(*registration, d.name+"-reg.sock"))
	}

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	stopReg()
	stopCSI()
}

// serve listens on a unix socket (replacing a stale one) and returns a function that stops the server.
func serve(s *grpc.Server, path string) func() {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		klog.Fatalf("socket directory: %v", err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		klog.Fatalf("stale socket %s: %v", path, err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		klog.Fatalf("listen %s: %v", path, err)
	}
	go func() {
		if err := s.Serve(l); err != nil {
			klog.Errorf("serve %s: %v", path, err)
		}
	}()
	klog.Infof("serving on %s", path)
	return func() { s.GracefulStop(); _ = os.Remove(path) }
}

func logCalls(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	resp, err := handler(ctx, req)
	if err != nil {
		klog.Errorf("%s: %v", info.FullMethod, err)
	} else {
		klog.V(4).Infof("%s: ok", info.FullMethod)
	}
	return resp, err
}

// registrar answers the kubelet's plugin watcher, as node-driver-registrar does.
type registrar struct {
	registerapi.UnimplementedRegistrationServer
	name, endpoint string
}

func (r *registrar) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              r.name,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *registrar) NotifyRegistrationStatus(_ context.Context, s *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if !s.PluginRegistered {
		klog.Errorf("the kubelet refused the registration: %s", s.Error)
	} else {
		klog.Info("registered with the kubelet")
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

// ---- identity ----

func (d *driver) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: d.name, VendorVersion: version}, nil
}

func (d *driver) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	return &csi.GetPluginCapabilitiesResponse{Capabilities: []*csi.PluginCapability{
		{Type: &csi.PluginCapability_Service_{Service: &csi.PluginCapability_Service{Type: csi.PluginCapability_Service_CONTROLLER_SERVICE}}},
		{Type: &csi.PluginCapability_VolumeExpansion_{VolumeExpansion: &csi.PluginCapability_VolumeExpansion{Type: csi.PluginCapability_VolumeExpansion_ONLINE}}},
	}}, nil
}

func (d *driver) Probe(context.Context, *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	return &csi.ProbeResponse{}, nil
}

// ---- controller ----

func (d *driver) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	var caps []*csi.ControllerServiceCapability
	for _, c := range []csi.ControllerServiceCapability_RPC_Type{
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT,
		csi.ControllerServiceCapability_RPC_LIST_SNAPSHOTS,
		csi.ControllerServiceCapability_RPC_CLONE_VOLUME,
		csi.ControllerServiceCapability_RPC_EXPAND_VOLUME,
	} {
		caps = append(caps, &csi.ControllerServiceCapability{Type: &csi.ControllerServiceCapability_Rpc{Rpc: &csi.ControllerServiceCapability_RPC{Type: c}}})
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: caps}, nil
}

func checkName(what, name string) error {
	if name == "" || len(name) > maxNameLength || !validName.MatchString(name) {
		return status.Errorf(codes.InvalidArgument, "%s %q is not a valid name", what, name)
	}
	return nil
}

func checkCapabilities(caps []*csi.VolumeCapability) error {
	if len(caps) == 0 {
		return status.Error(codes.InvalidArgument, "volume capabilities are required")
	}
	for _, c := range caps {
		if c.GetBlock() != nil {
			return status.Error(codes.InvalidArgument, "block volumes are not supported")
		}
	}
	return nil
}

func (d *driver) path(kind, id string, elem ...string) string {
	return filepath.Join(append([]string{d.stateDir, kind, id}, elem...)...)
}

func readMeta(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}

func writeMeta(path string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// copyTree copies the contents of src into dst, keeping owners, modes, times and links.
func copyTree(src, dst string) error {
	out, err := exec.Command("cp", "-a", "--", src+"/.", dst+"/").CombinedOutput()
	if err != nil {
		return fmt.Errorf("cp -a %s %s: %v: %s", src, dst, err, out)
	}
	return nil
}

func (d *driver) CreateVolume(_ context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	if err := checkName("volume", req.GetName()); err != nil {
		return nil, err
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return nil, err
	}
	size := req.GetCapacityRange().GetRequiredBytes()
	if size == 0 {
		size = defaultSize
	}
	if limit := req.GetCapacityRange().GetLimitBytes(); limit > 0 && size > limit {
		return nil, status.Errorf(codes.OutOfRange, "required %d bytes exceeds the limit of %d", size, limit)
	}
	d.mu.Lock()
	defer d.mu.Unlock()

	id := req.GetName()
	var existing volumeMeta
	if err := readMeta(d.path(volumesDir, id, metaFile), &existing); err == nil {
		if existing.Capacity < size {
			return nil, status.Errorf(codes.AlreadyExists, "volume %s exists with %d bytes", id, existing.Capacity)
		}
		return &csi.CreateVolumeResponse{Volume: &csi.Volume{VolumeId: id, CapacityBytes: existing.Capacity, ContentSource: req.GetVolumeContentSource()}}, nil
	}

	meta := volumeMeta{Name: id, Capacity: size}
	var from string
	if src := req.GetVolumeContentSource(); src != nil {
		switch {
		case src.GetSnapshot() != nil:
			meta.SourceSnap = src.GetSnapshot().GetSnapshotId()
			var sm snapshotMeta
			if err := readMeta(d.path(snapshotsDir, meta.SourceSnap, metaFile), &sm); err != nil {
				return nil, status.Errorf(codes.NotFound, "snapshot %s: %v", meta.SourceSnap, err)
			}
			if sm.Size > size {
				return nil, status.Errorf(codes.OutOfRange, "snapshot %s needs %d bytes, %d asked", meta.SourceSnap, sm.Size, size)
			}
			from = d.path(snapshotsDir, meta.SourceSnap, dataDir)
		case src.GetVolume() != nil:
			meta.SourceVol = src.GetVolume().GetVolumeId()
			var vm volumeMeta
			if err := readMeta(d.path(volumesDir, meta.SourceVol, metaFile), &vm); err != nil {
				return nil, status.Errorf(codes.NotFound, "volume %s: %v", meta.SourceVol, err)
			}
			if vm.Capacity > size {
				return nil, status.Errorf(codes.OutOfRange, "volume %s has %d bytes, %d asked", meta.SourceVol, vm.Capacity, size)
			}
			from = d.path(volumesDir, meta.SourceVol, dataDir)
		}
	}

	// Built under a temporary name and renamed, so a crash never leaves a half-copied volume behind a
	// valid meta.json.
	tmp := d.path(volumesDir, "."+id+".tmp")
	_ = os.RemoveAll(tmp)
	if err := os.MkdirAll(filepath.Join(tmp, dataDir), 0o777); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	// Pods of any uid may write the volume root unless fsGroup changes it (as a fresh filesystem's root).
	if err := os.Chmod(filepath.Join(tmp, dataDir), 0o777); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if from != "" {
		if err := copyTree(from, filepath.Join(tmp, dataDir)); err != nil {
			_ = os.RemoveAll(tmp)
			return nil, status.Error(codes.Internal, err.Error())
		}
	}
	if err := writeMeta(filepath.Join(tmp, metaFile), meta); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if err := os.Rename(tmp, d.path(volumesDir, id)); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	klog.Infof("created volume %s (%d bytes, from %q)", id, size, from)
	return &csi.CreateVolumeResponse{Volume: &csi.Volume{VolumeId: id, CapacityBytes: size, ContentSource: req.GetVolumeContentSource()}}, nil
}

func (d *driver) DeleteVolume(_ context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	if err := checkName("volume", req.GetVolumeId()); err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := os.RemoveAll(d.path(volumesDir, req.GetVolumeId())); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	klog.Infof("deleted volume %s", req.GetVolumeId())
	return &csi.DeleteVolumeResponse{}, nil
}

func (d *driver) ValidateVolumeCapabilities(_ context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	if err := checkName("volume", req.GetVolumeId()); err != nil {
		return nil, err
	}
	if _, err := os.Stat(d.path(volumesDir, req.GetVolumeId(), metaFile)); err != nil {
		return nil, status.Errorf(codes.NotFound, "volume %s", req.GetVolumeId())
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: err.Error()}, nil
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext: req.GetVolumeContext(), VolumeCapabilities: req.GetVolumeCapabilities(), Parameters: req.GetParameters(),
	}}, nil
}

func (d *driver) ControllerExpandVolume(_ context.Context, req *csi.ControllerExpandVolumeRequest) (*csi.ControllerExpandVolumeResponse, error) {
	if err := checkName("volume", req.GetVolumeId()); err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	path := d.path(volumesDir, req.GetVolumeId(), metaFile)
	var meta volumeMeta
	if err := readMeta(path, &meta); err != nil {
		return nil, status.Errorf(codes.NotFound, "volume %s", req.GetVolumeId())
	}
	if size := req.GetCapacityRange().GetRequiredBytes(); size > meta.Capacity {
		meta.Capacity = size
		if err := writeMeta(path, meta); err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
	}
	return &csi.ControllerExpandVolumeResponse{CapacityBytes: meta.Capacity, NodeExpansionRequired: false}, nil
}

func (d *driver) snapshot(id string, m snapshotMeta) *csi.Snapshot {
	return &csi.Snapshot{
		SnapshotId: id, SourceVolumeId: m.SourceVolume, SizeBytes: m.Size,
		CreationTime: timestamppb.New(m.CreatedAt), ReadyToUse: true,
	}
}

func (d *driver) CreateSnapshot(_ context.Context, req *csi.CreateSnapshotRequest) (*csi.CreateSnapshotResponse, error) {
	if err := checkName("snapshot", req.GetName()); err != nil {
		return nil, err
	}
	if err := checkName("source volume", req.GetSourceVolumeId()); err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	id := req.GetName()
	var existing snapshotMeta
	if err := readMeta(d.path(snapshotsDir, id, metaFile), &existing); err == nil {
		if existing.SourceVolume != req.GetSourceVolumeId() {
			return nil, status.Errorf(codes.AlreadyExists, "snapshot %s exists for volume %s", id, existing.SourceVolume)
		}
		return &csi.CreateSnapshotResponse{Snapshot: d.snapshot(id, existing)}, nil
	}
	var vm volumeMeta
	if err := readMeta(d.path(volumesDir, req.GetSourceVolumeId(), metaFile), &vm); err != nil {
		return nil, status.Errorf(codes.NotFound, "volume %s", req.GetSourceVolumeId())
	}
	tmp := d.path(snapshotsDir, "."+id+".tmp")
	_ = os.RemoveAll(tmp)
	if err := os.MkdirAll(filepath.Join(tmp, dataDir), 0o700); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if err := copyTree(d.path(volumesDir, req.GetSourceVolumeId(), dataDir), filepath.Join(tmp, dataDir)); err != nil {
		_ = os.RemoveAll(tmp)
		return nil, status.Error(codes.Internal, err.Error())
	}
	meta := snapshotMeta{Name: id, SourceVolume: req.GetSourceVolumeId(), Size: vm.Capacity, CreatedAt: time.Now().UTC()}
	if err := writeMeta(filepath.Join(tmp, metaFile), meta); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if err := os.Rename(tmp, d.path(snapshotsDir, id)); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	klog.Infof("created snapshot %s of volume %s", id, meta.SourceVolume)
	return &csi.CreateSnapshotResponse{Snapshot: d.snapshot(id, meta)}, nil
}

func (d *driver) DeleteSnapshot(_ context.Context, req *csi.DeleteSnapshotRequest) (*csi.DeleteSnapshotResponse, error) {
	if err := checkName("snapshot", req.GetSnapshotId()); err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := os.RemoveAll(d.path(snapshotsDir, req.GetSnapshotId())); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	klog.Infof("deleted snapshot %s", req.GetSnapshotId())
	return &csi.DeleteSnapshotResponse{}, nil
}

func (d *driver) ListSnapshots(_ context.Context, req *csi.ListSnapshotsRequest) (*csi.ListSnapshotsResponse, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	entries, err := os.ReadDir(filepath.Join(d.stateDir, snapshotsDir))
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	var ids []string
	for _, e := range entries {
		if e.IsDir() && e.Name()[0] != '.' {
			ids = append(ids, e.Name())
		}
	}
	sort.Strings(ids)
	var out []*csi.ListSnapshotsResponse_Entry
	for _, id := range ids {
		if req.GetSnapshotId() != "" && id != req.GetSnapshotId() {
			continue
		}
		var m snapshotMeta
		if err := readMeta(d.path(snapshotsDir, id, metaFile), &m); err != nil {
			continue
		}
		if req.GetSourceVolumeId() != "" && m.SourceVolume != req.GetSourceVolumeId() {
			continue
		}
		out = append(out, &csi.ListSnapshotsResponse_Entry{Snapshot: d.snapshot(id, m)})
	}
	// Paging: the token is the index of the first entry to return.
	start := 0
	if t := req.GetStartingToken(); t != "" {
		if _, err := fmt.Sscanf(t, "%d", &start); err != nil || start < 0 || start > len(out) {
			return nil, status.Errorf(codes.Aborted, "invalid starting token %q", t)
		}
	}
	out = out[start:]
	next := ""
	if max := int(req.GetMaxEntries()); max > 0 && len(out) > max {
		out = out[:max]
		next = fmt.Sprint(start + max)
	}
	return &csi.ListSnapshotsResponse{Entries: out, NextToken: next}, nil
}

// ---- node ----

func (d *driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: d.nodeID}, nil
}

func (d *driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	return &csi.NodeGetCapabilitiesResponse{}, nil
}

func (d *driver) NodePublishVolume(_ context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	if err := checkName("volume", req.GetVolumeId()); err != nil {
		return nil, err
	}
	target := req.GetTargetPath()
	if target == "" {
		return nil, status.Error(codes.InvalidArgument, "target path is required")
	}
	if err := checkCapabilities([]*csi.VolumeCapability{req.GetVolumeCapability()}); err != nil {
		return nil, err
	}
	src := d.path(volumesDir, req.GetVolumeId(), dataDir)
	if _, err := os.Stat(src); err != nil {
		return nil, status.Errorf(codes.NotFound, "volume %s", req.GetVolumeId())
	}
	if err := os.MkdirAll(target, 0o750); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	notMnt, err := d.mounter.IsLikelyNotMountPoint(target)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if !notMnt {
		return &csi.NodePublishVolumeResponse{}, nil
	}
	opts := []string{"bind"}
	if req.GetReadonly() {
		opts = append(opts, "ro")
	}
	if err := d.mounter.Mount(src, target, "", opts); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &csi.NodePublishVolumeResponse{}, nil
}

func (d *driver) NodeUnpublishVolume(_ context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	if req.GetTargetPath() == "" {
		return nil, status.Error(codes.InvalidArgument, "target path is required")
	}
	if err := mount.CleanupMountPoint(req.GetTargetPath(), d.mounter, true); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &csi.NodeUnpublishVolumeResponse{}, nil
}
