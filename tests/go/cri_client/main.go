// A CRI client on gRPC-Go that dials the way Kubernetes 1.26's remote
// runtime client (kubelet, crictl, critest) does: the socket path as the
// target, a custom unix dialer, no WithAuthority — so gRPC-Go sends the path
// as HTTP/2 :authority. Built by tests/tests/cri_clients.rs in GOPATH mode
// against Debian's gRPC-Go, with stubs generated from k8s-cri's proto into
// the package vcrtest/criv1.
//
//	cri_client version  -socket PATH
//	cri_client status   -socket PATH
//	cri_client pod-flow -socket PATH -pod POD.json -container CTR.json
//
// Each prints one JSON object on stdout; a failure goes to stderr, exit 1.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	criv1 "vcrtest/criv1"
)

const maxMsgSize = 1024 * 1024 * 16

// dial is Kubernetes 1.26's remote.NewRemoteRuntimeService: the address is
// the bare path (util.GetAddressAndDialer strips unix://), the dialer
// net.Dialer{}.DialContext(ctx, "unix", addr). grpc 1.33 has WithInsecure
// where 1.26 uses WithTransportCredentials(insecure.NewCredentials()).
func dial(ctx context.Context, path string) (*grpc.ClientConn, error) {
	dialer := func(ctx context.Context, addr string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", addr)
	}
	return grpc.DialContext(ctx, path,
		grpc.WithInsecure(),
		grpc.WithContextDialer(dialer),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMsgSize)))
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

func emit(v interface{}) {
	out, err := json.Marshal(v)
	if err != nil {
		fail("json: %v", err)
	}
	fmt.Println(string(out))
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: cri_client version|status|pod-flow -socket PATH ...")
	}
	cmd := os.Args[1]
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	socket := fs.String("socket", "", "the CRI socket's path")
	podFile := fs.String("pod", "", "PodSandboxConfig as JSON (pod-flow)")
	ctrFile := fs.String("container", "", "ContainerConfig as JSON (pod-flow)")
	timeout := fs.Duration("timeout", 10*time.Minute, "for the whole command")
	if err := fs.Parse(os.Args[2:]); err != nil {
		fail("%v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	conn, err := dial(ctx, *socket)
	if err != nil {
		fail("dial: %v", err)
	}
	defer conn.Close()
	rt := criv1.NewRuntimeServiceClient(conn)
	switch cmd {
	case "version":
		v, err := rt.Version(ctx, &criv1.VersionRequest{Version: "v1"})
		if err != nil {
			fail("Version: %v", err)
		}
		emit(map[string]string{
			"version":             v.Version,
			"runtime_name":        v.RuntimeName,
			"runtime_version":     v.RuntimeVersion,
			"runtime_api_version": v.RuntimeApiVersion,
		})
	case "status":
		s, err := rt.Status(ctx, &criv1.StatusRequest{})
		if err != nil {
			fail("Status: %v", err)
		}
		conditions := map[string]bool{}
		for _, c := range s.GetStatus().GetConditions() {
			conditions[c.Type] = c.Status
		}
		emit(map[string]interface{}{"conditions": conditions})
	case "pod-flow":
		podFlow(ctx, rt, *podFile, *ctrFile)
	default:
		fail("unknown command %q", cmd)
	}
}

func podFlow(ctx context.Context, rt criv1.RuntimeServiceClient, podFile, ctrFile string) {
	var pod criv1.PodSandboxConfig
	var ctr criv1.ContainerConfig
	for _, f := range []struct {
		path string
		msg  proto.Message
	}{{podFile, &pod}, {ctrFile, &ctr}} {
		data, err := os.ReadFile(f.path)
		if err != nil {
			fail("%v", err)
		}
		if err := protojson.Unmarshal(data, f.msg); err != nil {
			fail("%s: %v", f.path, err)
		}
	}
	if err := os.MkdirAll(pod.LogDirectory, 0o755); err != nil {
		fail("%v", err)
	}
	result := map[string]interface{}{}

	run, err := rt.RunPodSandbox(ctx, &criv1.RunPodSandboxRequest{Config: &pod})
	if err != nil {
		fail("RunPodSandbox: %v", err)
	}
	podID := run.PodSandboxId
	result["pod_id"] = podID
	created, err := rt.CreateContainer(ctx, &criv1.CreateContainerRequest{
		PodSandboxId: podID, Config: &ctr, SandboxConfig: &pod,
	})
	if err != nil {
		fail("CreateContainer: %v", err)
	}
	ctrID := created.ContainerId
	result["container_id"] = ctrID
	if _, err := rt.StartContainer(ctx, &criv1.StartContainerRequest{ContainerId: ctrID}); err != nil {
		fail("StartContainer: %v", err)
	}

	exec, err := rt.ExecSync(ctx, &criv1.ExecSyncRequest{
		ContainerId: ctrID,
		Cmd:         []string{"sh", "-c", "echo hello from $(hostname)"},
		Timeout:     120,
	})
	if err != nil {
		fail("ExecSync: %v", err)
	}
	result["exec_stdout"] = string(exec.Stdout)
	result["exec_stderr"] = string(exec.Stderr)
	result["exec_exit_code"] = exec.ExitCode

	// The event stream is open before the stop, so it sees the STOPPED event.
	evCtx, evCancel := context.WithCancel(ctx)
	defer evCancel()
	events, err := rt.GetContainerEvents(evCtx, &criv1.GetEventsRequest{})
	if err != nil {
		fail("GetContainerEvents: %v", err)
	}
	stopped := make(chan string, 1)
	go func() {
		for {
			ev, err := events.Recv()
			if err != nil {
				stopped <- "stream ended: " + err.Error()
				return
			}
			if ev.ContainerId == ctrID && ev.ContainerEventType == criv1.ContainerEventType_CONTAINER_STOPPED_EVENT {
				stopped <- ev.ContainerEventType.String()
				return
			}
		}
	}()
	// Let the stream reach the server before the stop.
	time.Sleep(500 * time.Millisecond)
	if _, err := rt.StopContainer(ctx, &criv1.StopContainerRequest{ContainerId: ctrID, Timeout: 10}); err != nil {
		fail("StopContainer: %v", err)
	}
	select {
	case ev := <-stopped:
		result["event"] = ev
	case <-time.After(2 * time.Minute):
		result["event"] = "none within 2 minutes"
	}
	st, err := rt.ContainerStatus(ctx, &criv1.ContainerStatusRequest{ContainerId: ctrID})
	if err != nil {
		fail("ContainerStatus: %v", err)
	}
	result["state_after_stop"] = st.GetStatus().GetState().String()

	if _, err := rt.RemoveContainer(ctx, &criv1.RemoveContainerRequest{ContainerId: ctrID}); err != nil {
		fail("RemoveContainer: %v", err)
	}
	if _, err := rt.StopPodSandbox(ctx, &criv1.StopPodSandboxRequest{PodSandboxId: podID}); err != nil {
		fail("StopPodSandbox: %v", err)
	}
	if _, err := rt.RemovePodSandbox(ctx, &criv1.RemovePodSandboxRequest{PodSandboxId: podID}); err != nil {
		fail("RemovePodSandbox: %v", err)
	}
	pods, err := rt.ListPodSandbox(ctx, &criv1.ListPodSandboxRequest{})
	if err != nil {
		fail("ListPodSandbox: %v", err)
	}
	result["pods_left"] = len(pods.Items)
	emit(result)
}
