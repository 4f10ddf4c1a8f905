/*
 * vfio-user round-trip driver for bench/server_roundtrip.py.
 *
 * usage: server_roundtrip_client SOCKET OPS
 * Sends VERSION, warms up, prints "READY", waits for a line on stdin, then times OPS
 * config-space REGION_READs (4 bytes at offset 0 of region 7), one at a time, and prints
 * "RESULT ops=N total_ns=T p50_ns=A p99_ns=B".
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

struct hdr { uint16_t id, cmd; uint32_t size, flags, err; };
struct access { uint64_t offset; uint32_t region, count; };

static int fd;

static void xread(void *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, (char *)buf + got, n - got);
        if (r <= 0) { perror("read"); exit(1); }
        got += (size_t)r;
    }
}

static void xwrite(const void *buf, size_t n) {
    if (write(fd, buf, n) != (ssize_t)n) { perror("write"); exit(1); }
}

static void roundtrip(uint16_t id, uint16_t cmd, const void *payload, uint32_t len) {
    char msg[4096], reply[4096];
    struct hdr h = { id, cmd, (uint32_t)(sizeof h + len), 0, 0 }, rh;
    memcpy(msg, &h, sizeof h);
    memcpy(msg + sizeof h, payload, len);
    xwrite(msg, sizeof h + len);
    xread(&rh, sizeof rh);
    if (rh.size < sizeof rh || rh.size > sizeof reply) { fprintf(stderr, "bad reply\n"); exit(1); }
    xread(reply, rh.size - sizeof rh);
    if (rh.flags & 0x20) { fprintf(stderr, "error reply %u\n", rh.err); exit(1); }
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s SOCKET OPS\n", argv[0]); return 2; }
    long ops = atol(argv[2]);
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    strncpy(addr.sun_path, argv[1], sizeof addr.sun_path - 1);
    fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr)) { perror("connect"); return 1; }
    static const char version[] = "\0\0\0\0{\"capabilities\":{\"max_msg_fds\":16}}";
    roundtrip(1, 1, version, sizeof version);
    struct access a = { 0, 7, 4 };
    for (int i = 0; i < 2000; i++) roundtrip((uint16_t)i, 9, &a, sizeof a);
    printf("READY\n");
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 1;
    uint64_t *lat = malloc(sizeof *lat * (size_t)ops);
    uint64_t start = now_ns();
    for (long i = 0; i < ops; i++) {
        uint64_t t0 = now_ns();
        roundtrip((uint16_t)i, 9, &a, sizeof a);
        lat[i] = now_ns() - t0;
    }
    uint64_t total = now_ns() - start;
    qsort(lat, (size_t)ops, sizeof *lat, cmp);
    printf("RESULT ops=%ld total_ns=%llu p50_ns=%llu p99_ns=%llu\n", ops,
           (unsigned long long)total, (unsigned long long)lat[ops / 2],
           (unsigned long long)lat[ops * 99 / 100]);
    fflush(stdout);
    close(fd);
    return 0;
}
