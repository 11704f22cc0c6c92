/*
 * The sandbox ("pause") container of every pod: holds the pod's namespaces, sleeps until SIGINT or
 * SIGTERM, and reaps the zombies it inherits as PID 1 when the pod shares its process namespace.
 * Built static (`gcc -static -O2`) by e2e/build-images.sh and packed as registry.k8s.io/pause:3.10,
 * so containerd's default sandbox image needs no pull. Same behaviour as Kubernetes' own pause.c.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define VERSION "3.10"

/* Exits from the handler itself: nothing can slip in between a flag check and pause(). */
static void on_stop(int sig) {
  static const char msg[] = "Shutting down, got signal\n";
  (void)sig;
  (void)!write(STDERR_FILENO, msg, sizeof msg - 1);
  _exit(0);
}

static void on_child(int sig) {
  (void)sig;
  int saved = errno;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
  errno = saved;
}

static int install(int sig, void (*handler)(int), int flags) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = handler;
  sa.sa_flags = flags;
  sigemptyset(&sa.sa_mask);
  return sigaction(sig, &sa, NULL);
}

int main(int argc, char **argv) {
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "-v") == 0) {
      printf("pause.c %s\n", VERSION);
      return 0;
    }
  }
  if (getpid() != 1) {
    fprintf(stderr, "Warning: pause should be the first process\n");
  }
  if (install(SIGINT, on_stop, 0) < 0 || install(SIGTERM, on_stop, 0) < 0 ||
      install(SIGCHLD, on_child, SA_NOCLDSTOP | SA_RESTART) < 0) {
    perror("sigaction");
    return 1;
  }
  for (;;) {
    pause();
  }
}
