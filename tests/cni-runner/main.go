// cni-runner runs a CNI conflist through libcni, the library container
// runtimes use: cni-runner ADD|CHECK|DEL|GC <conflist>. The attachment comes
// from RUNNER_CONTAINERID, RUNNER_NETNS, RUNNER_IFNAME and RUNNER_ARGS
// (K=V;K=V); plugins from CNI_PATH. ADD prints the result; every command
// prints "elapsed_us=N" on stderr; a failure prints "cni_error_code=N" (the
// plugin's CNI error code) and the error on stderr. libcni 1.1 has no GC, so GC sends
// CNI_COMMAND=GC with RUNNER_VALID (a JSON list of {containerID, ifname}) as
// cni.dev/valid-attachments to each podnet-cni entry of the list.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: cni-runner ADD|CHECK|DEL|GC <conflist>")
		os.Exit(2)
	}
	list, err := libcni.ConfListFromFile(os.Args[2])
	if err != nil {
		fail(err)
	}
	paths := filepath.SplitList(os.Getenv("CNI_PATH"))
	cni := libcni.NewCNIConfigWithCacheDir(paths, os.Getenv("RUNNER_CACHEDIR"), nil)
	rt := &libcni.RuntimeConf{
		ContainerID: os.Getenv("RUNNER_CONTAINERID"),
		NetNS:       os.Getenv("RUNNER_NETNS"),
		IfName:      os.Getenv("RUNNER_IFNAME"),
	}
	for _, kv := range strings.Split(os.Getenv("RUNNER_ARGS"), ";") {
		if k, v, ok := strings.Cut(kv, "="); ok {
			rt.Args = append(rt.Args, [2]string{k, v})
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	switch os.Args[1] {
	case "ADD":
		res, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			fail(err)
		}
		_ = res.Print()
	case "CHECK":
		err = cni.CheckNetworkList(ctx, list, rt)
	case "DEL":
		err = cni.DelNetworkList(ctx, list, rt)
	case "GC":
		err = gc(ctx, list, paths)
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fail(err)
	}
	elapsed(start)
}

func gc(ctx context.Context, list *libcni.NetworkConfigList, paths []string) error {
	var valid []map[string]string
	if err := json.Unmarshal([]byte(os.Getenv("RUNNER_VALID")), &valid); err != nil {
		return fmt.Errorf("RUNNER_VALID: %w", err)
	}
	exec := &invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: os.Stderr}}
	for _, p := range list.Plugins {
		if p.Network.Type != "podnet-cni" {
			continue
		}
		var conf map[string]interface{}
		if err := json.Unmarshal(p.Bytes, &conf); err != nil {
			return err
		}
		conf["name"] = list.Name
		conf["cniVersion"] = "1.1.0"
		conf["cni.dev/valid-attachments"] = valid
		bytes, _ := json.Marshal(conf)
		path, err := exec.FindInPath(p.Network.Type, paths)
		if err != nil {
			return err
		}
		args := &invoke.Args{Command: "GC", Path: strings.Join(paths, ":")}
		if err := invoke.ExecPluginWithoutResult(ctx, path, bytes, args, exec); err != nil {
			return err
		}
	}
	return nil
}

func elapsed(start time.Time) {
	fmt.Fprintf(os.Stderr, "elapsed_us=%d\n", time.Since(start).Microseconds())
}

func fail(err error) {
	// The plugin's CNI error code, which libcni keeps in the wrapped error.
	var cniErr *types.Error
	if errors.As(err, &cniErr) {
		fmt.Fprintf(os.Stderr, "cni_error_code=%d\n", cniErr.Code)
	}
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}
