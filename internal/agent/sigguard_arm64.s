//go:build linux

#include "textflag.h"

// func sigGuard(): as sigguard_amd64.s; R0 the signal, R1 its siginfo,
// R2 the context, LR the restorer.
TEXT ·sigGuard(SB),NOSPLIT|NOFRAME,$0
	MOVW	8(R1), R3
	CMPW	$0, R3
	BLE	drop
	AND	$63, R0, R3
	MOVD	$·sigGuardNext(SB), R4
	MOVD	(R4)(R3<<3), R4
	JMP	(R4)
drop:
	RET

// func sigGuardPC() uintptr
TEXT ·sigGuardPC(SB),NOSPLIT,$0-8
	MOVD	$·sigGuard(SB), R0
	MOVD	R0, ret+0(FP)
	RET
