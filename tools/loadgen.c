/* Short-connection load for a SOCKS5 proxy, and the echo server it talks to.
 *
 *   loadgen echo HOST                 serve on HOST, an ephemeral port (printed)
 *   loadgen socks5 PROXY PPORT DST DPORT COUNT PARALLEL [pipelined|sequential]
 *
 * Each connection: connect to the proxy, SOCKS5 greeting (no authentication)
 * and CONNECT to DST:DPORT by address (in one write when "pipelined"), 4 bytes
 * sent, 4 bytes read back, then the server's close.  The echo server closes
 * its side once it has echoed the first bytes, so TIME_WAIT falls on the
 * server's sockets, not on the ephemeral ports of client or proxy.
 *
 * Written in C so that the load takes little of the cores the proxy measured
 * needs: the Python generator in bench.py takes a core of its own.  Prints one
 * line: "ok N failed M seconds S".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define IO_TIMEOUT_SECONDS 10

static struct sockaddr_storage proxy_address, target_address;
static socklen_t proxy_length;
static unsigned char request[32];
static size_t request_length;
static int pipelined = 1;
static atomic_long remaining, succeeded, failed;

static int parse_address(const char *host, const char *port, struct sockaddr_storage *out, socklen_t *length) {
    struct sockaddr_in *v4 = (struct sockaddr_in *)out;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)out;
    memset(out, 0, sizeof *out);
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((unsigned short)atoi(port));
        *length = sizeof *v4;
        return 0;
    }
    if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((unsigned short)atoi(port));
        *length = sizeof *v6;
        return 0;
    }
    fprintf(stderr, "loadgen: %s is not an IP address\n", host);
    return -1;
}

static int read_exact(int fd, unsigned char *buffer, size_t size) {
    size_t got = 0;
    while (got < size) {
        ssize_t n = recv(fd, buffer + got, size - got, 0);
        if (n <= 0) {
            if (n < 0 && errno == EINTR) continue;
            return -1;
        }
        got += (size_t)n;
    }
    return 0;
}

static int write_all(int fd, const unsigned char *buffer, size_t size) {
    while (size) {
        ssize_t n = send(fd, buffer, size, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        buffer += n;
        size -= (size_t)n;
    }
    return 0;
}

static int one_connection(void) {
    static const unsigned char greeting[3] = {5, 1, 0};
    static const unsigned char ping[4] = {'p', 'i', 'n', 'g'};
    unsigned char buffer[64];
    struct timeval timeout = {IO_TIMEOUT_SECONDS, 0};
    int ok = -1;
    int fd = socket(proxy_address.ss_family, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    int on = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
    if (connect(fd, (struct sockaddr *)&proxy_address, proxy_length) < 0) goto done;
    if (pipelined) {
        unsigned char both[3 + sizeof request];
        memcpy(both, greeting, 3);
        memcpy(both + 3, request, request_length);
        if (write_all(fd, both, 3 + request_length) < 0) goto done;
        if (read_exact(fd, buffer, 2) < 0 || buffer[1] != 0) goto done;
    } else {
        if (write_all(fd, greeting, 3) < 0) goto done;
        if (read_exact(fd, buffer, 2) < 0 || buffer[1] != 0) goto done;
        if (write_all(fd, request, request_length) < 0) goto done;
    }
    /* The reply: 05 00 00 ATYP, then 4 or 16 address bytes and a port. */
    if (read_exact(fd, buffer, 4) < 0 || buffer[1] != 0) goto done;
    if (read_exact(fd, buffer, buffer[3] == 4 ? 18 : 6) < 0) goto done;
    if (write_all(fd, ping, 4) < 0) goto done;
    if (read_exact(fd, buffer, 4) < 0 || memcmp(buffer, ping, 4) != 0) goto done;
    ok = recv(fd, buffer, 1, 0) == 0 ? 0 : -1; /* the server's close */
done:
    close(fd);
    return ok;
}

static void *client_thread(void *unused) {
    (void)unused;
    while (atomic_fetch_sub(&remaining, 1) > 0) {
        if (one_connection() == 0)
            atomic_fetch_add(&succeeded, 1);
        else
            atomic_fetch_add(&failed, 1);
    }
    return NULL;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int run_socks5(char **argv, int argc) {
    socklen_t target_length;
    if (parse_address(argv[2], argv[3], &proxy_address, &proxy_length) < 0) return 2;
    if (parse_address(argv[4], argv[5], &target_address, &target_length) < 0) return 2;
    long count = atol(argv[6]);
    int parallel = atoi(argv[7]);
    if (count < 1 || parallel < 1 || parallel > 1024) {
        fprintf(stderr, "loadgen: COUNT and PARALLEL must be positive (PARALLEL at most 1024)\n");
        return 2;
    }
    if (argc > 8) pipelined = strcmp(argv[8], "sequential") != 0;
    unsigned char *p = request;
    *p++ = 5, *p++ = 1, *p++ = 0;
    if (target_address.ss_family == AF_INET) {
        struct sockaddr_in *v4 = (struct sockaddr_in *)&target_address;
        *p++ = 1;
        memcpy(p, &v4->sin_addr, 4), p += 4;
        memcpy(p, &v4->sin_port, 2), p += 2;
    } else {
        struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&target_address;
        *p++ = 4;
        memcpy(p, &v6->sin6_addr, 16), p += 16;
        memcpy(p, &v6->sin6_port, 2), p += 2;
    }
    request_length = (size_t)(p - request);
    atomic_store(&remaining, count);
    pthread_t threads[1024];
    double began = now();
    for (int i = 0; i < parallel; i++) pthread_create(&threads[i], NULL, client_thread, NULL);
    for (int i = 0; i < parallel; i++) pthread_join(threads[i], NULL);
    printf("ok %ld failed %ld seconds %.6f\n", atomic_load(&succeeded), atomic_load(&failed), now() - began);
    return 0;
}

static int run_echo(const char *host) {
    struct sockaddr_storage address;
    socklen_t length;
    if (parse_address(host, "0", &address, &length) < 0) return 2;
    int listener = socket(address.ss_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int on = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
    if (listener < 0 || bind(listener, (struct sockaddr *)&address, length) < 0 || listen(listener, 4096) < 0) {
        perror("loadgen: echo");
        return 1;
    }
    getsockname(listener, (struct sockaddr *)&address, &length);
    printf("%d\n", ntohs(address.ss_family == AF_INET ? ((struct sockaddr_in *)&address)->sin_port
                                                      : ((struct sockaddr_in6 *)&address)->sin6_port));
    fflush(stdout);
    int poller = epoll_create1(0);
    struct epoll_event event = {.events = EPOLLIN, .data.fd = listener};
    epoll_ctl(poller, EPOLL_CTL_ADD, listener, &event);
    struct epoll_event ready[256];
    unsigned char buffer[4096];
    for (;;) {
        int n = epoll_wait(poller, ready, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = ready[i].data.fd;
            if (fd == listener) {
                int client;
                while ((client = accept4(listener, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
                    struct epoll_event added = {.events = EPOLLIN, .data.fd = client};
                    epoll_ctl(poller, EPOLL_CTL_ADD, client, &added);
                }
                continue;
            }
            ssize_t got = recv(fd, buffer, sizeof buffer, 0);
            if (got < 0 && errno == EAGAIN) continue;
            if (got > 0) send(fd, buffer, (size_t)got, MSG_NOSIGNAL);
            close(fd); /* after one echo, or at the client's close or error */
        }
    }
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "echo") == 0) return run_echo(argv[2]);
    if ((argc == 8 || argc == 9) && strcmp(argv[1], "socks5") == 0) return run_socks5(argv, argc);
    fprintf(stderr,
            "usage: loadgen echo HOST\n"
            "       loadgen socks5 PROXY PPORT DST DPORT COUNT PARALLEL [pipelined|sequential]\n");
    return 2;
}
